"""Process hygiene: which variables count as secrets, and SIGTERM taken as Ctrl-C inside a
block, ignored when repeated, and the previous handler put back after it; a Ctrl-C a
command leaves unhandled."""

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from eclip.process import scrub_environment, sigterm_as_ctrl_c


@pytest.mark.parametrize("name", [
    "OPENAI_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
    "GOOGLE_APPLICATION_CREDENTIALS",
    # the case of a name does not hide it
    "hf_token", "My_Api_Key",
])
def test_a_secret_looking_variable_is_scrubbed(name):
    env = {name: "value", "PATH": "/bin", "HOME": "/home/u"}
    assert scrub_environment(env) == [name]
    assert env == {"PATH": "/bin", "HOME": "/home/u"}


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "tokenizers_parallelism"])
def test_a_setting_that_merely_starts_like_a_token_is_kept(name):
    # the tokenizers library's switch reaches the recipe as the user set it; a token doesn't
    env = {name: "false", "HF_TOKEN": "hf_x"}
    assert scrub_environment(env) == ["HF_TOKEN"]
    assert env == {name: "false"}


@pytest.mark.parametrize("value,secret", [
    ("postgres://user:pw@db.example/prod", True),  # a password in a URL, under a name that says nothing
    ("https://:tok3n@git.example/repo.git", True),
    ("https://user@git.example/repo.git", False),  # a user name alone is no secret
    ("http://proxy.example:3128", False),  # a port is no password
])
def test_a_url_with_a_password_is_scrubbed_whatever_its_name(value, secret):
    env = {"DATABASE_URL": value, "PATH": "/bin"}
    assert scrub_environment(env) == (["DATABASE_URL"] if secret else [])
    assert ("DATABASE_URL" in env) is not secret


class Previous(Exception):
    """Raised by the handler installed before the block: reaching it means SIGTERM went to
    the old handler instead of the block's (and the default one would end pytest)."""


def previous_handler(signum, frame):
    raise Previous


@pytest.fixture
def previous():
    before = signal.signal(signal.SIGTERM, previous_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_inside_the_block_is_a_ctrl_c_and_a_repeat_is_ignored(previous):
    reached_cleanup = False
    with sigterm_as_ctrl_c():
        try:
            signal.raise_signal(signal.SIGTERM)
            raise AssertionError("SIGTERM was not taken as Ctrl-C")
        except KeyboardInterrupt:
            # the clean-up a Ctrl-C runs: a second SIGTERM (a process group's copy) must not
            # cut it short
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)
            reached_cleanup = True
    assert reached_cleanup
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # put back after the block
    with pytest.raises(Previous):
        signal.raise_signal(signal.SIGTERM)


def test_the_previous_handler_is_back_after_a_block_left_by_an_error(previous):
    with pytest.raises(RuntimeError, match="boom"):
        with sigterm_as_ctrl_c():
            assert signal.getsignal(signal.SIGTERM) is not previous_handler
            raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) is previous_handler


def test_outside_the_main_thread_the_block_is_a_no_op(previous):
    # signal handlers can only be set from the main thread: elsewhere the block runs its body
    # and leaves SIGTERM alone instead of failing with ValueError
    seen = []

    def body():
        try:
            with sigterm_as_ctrl_c():
                seen.append(signal.getsignal(signal.SIGTERM))
        except BaseException as e:  # reported to the main thread, which asserts
            seen.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [previous_handler]


def test_a_ctrl_c_main_leaves_unhandled_is_one_line_and_ends_by_sigint():
    # a Ctrl-C in a command's start-up (the loop creating its workspace, say) was a traceback
    code = ("import sys; sys.argv[0] = 'agent/loop.py'\nfrom eclip.process import exit_main\n"
            "def main():\n    raise KeyboardInterrupt\nexit_main(main)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    # by the signal, not exit code 130: a shell script running the command stops with it
    assert (done.returncode, done.stderr) == (-signal.SIGINT, "loop: interrupted\n")
