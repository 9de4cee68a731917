"""The flags several daemon verbs share (runtime/cli/flags.py) read the same on each verb:
--env, --put, --workspace with --cow, --label and --request-id; so do the id of a verb about
one sandbox or task (add_target_parser) and diff's output flags."""

from __future__ import annotations

import pytest

from corral.runtime.cli import build_parser
from corral.runtime.cli.flags import parse_env, parse_labels
from corral.sandbox.errors import InvalidSpec


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_task_submit_reads_the_shared_flags():
    args = _parse("task", "submit", "--put", "a.txt", "--put", "b.txt:in/b", "--env", "A=1",
                  "--workspace", "/srv/repo", "--cow", "--label", "team=x",
                  "--request-id", "r1", "--", "echo", "hi")
    assert args.put == ["a.txt", "b.txt:in/b"]
    assert parse_env(args.env) == {"A": "1"}
    assert (args.workspace, args.cow) == ("/srv/repo", True)
    assert parse_labels(args.label) == {"team": "x"}
    assert args.request_id == "r1"


def test_create_reads_the_shared_flags():
    args = _parse("create", "--env", "B=", "--workspace", "/srv/repo", "--label", "k")
    assert parse_env(args.env) == {"B": ""}
    assert (args.workspace, args.cow) == ("/srv/repo", False)
    assert parse_labels(args.label) == {"k": ""}
    assert args.request_id == ""


def test_session_put_and_exec_env():
    assert _parse("session", "--put", "notes.md", "--", "agent").put == ["notes.md"]
    assert _parse("session", "--", "agent").put == []
    args = _parse("exec", "--env", "X=y=z", "SB", "--", "env")
    assert parse_env(args.env) == {"X": "y=z"}


def test_run_env_keeps_its_help_and_rejects_a_bare_key():
    run_help = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "set a variable in the command's environment" in run_help
    args = _parse("run", "--env", "NOVALUE", "--", "true")
    with pytest.raises(InvalidSpec, match="env"):
        parse_env(args.env)


def test_put_help_names_where_the_file_goes():
    choices = build_parser()._subparsers._group_actions[0].choices
    task_help = choices["task"]._subparsers._group_actions[0].choices["submit"].format_help()
    assert "into the task's /workspace" in " ".join(task_help.split())
    session_help = " ".join(choices["session"].format_help().split())
    assert "into the new sandbox's /workspace first" in session_help


@pytest.mark.parametrize("verb", ["timeout", "stats", "inspect", "port", "destroy", "pause",
                                  "resume", "diff", "apply", "discard", "exec"])
def test_each_verb_about_one_sandbox_takes_it_first(verb):
    extra = {"timeout": ["90s"], "exec": ["--", "true"]}.get(verb, [])
    assert _parse(verb, "sb-1", *extra).sandbox_id == "sb-1"
    with pytest.raises(SystemExit):  # the sandbox is required
        _parse(verb)


@pytest.mark.parametrize("verb", ["get", "watch", "cancel", "result"])
def test_each_verb_about_one_task_reads_its_id(verb):
    assert _parse("task", verb, "task-1").task_id == "task-1"


def test_task_diff_reads_what_the_sandbox_diff_verb_reads():
    # `corral task diff` runs the same diff_verb as `corral diff`, on the task's change set
    plain = _parse("diff", "sb-1", "--stat", "--json")
    task = _parse("task", "diff", "task-1", "--stat", "--json")
    assert (plain.sandbox_id, plain.stat, plain.json) == ("sb-1", True, True)
    assert (task.sandbox_id, task.stat, task.json) == ("task-1", True, True)
    assert (task.handler, task.task_verb) == (_parse("task", "get", "x").handler, "diff")


@pytest.mark.parametrize(("verb", "tail"), [(["create"], []),
                                          (["task", "submit"], ["--", "true"])])
def test_a_label_without_a_key_is_refused_before_any_daemon_is_reached(verb, tail, capsys,
                                                                       tmp_path):
    from corral.runtime import cli

    socket = str(tmp_path / "nobody.sock")  # nothing listens: refused before connecting
    rc = cli.main([*verb, "--socket", socket, "--label", "=v", *tail])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "label: '=v' is not KEY=VALUE" in err


@pytest.mark.parametrize("verb", [["create"], ["task", "submit"]])
def test_from_names_the_snapshot_on_each_verb_that_starts_from_one(verb):
    tail = ["--", "true"] if verb[0] == "task" else []
    assert _parse(*verb, "--from", "base", *tail).from_snapshot == "base"
    assert _parse(*verb, *tail).from_snapshot is None


@pytest.mark.parametrize(("verb", "flag", "needs"), [
    (["session"], "--watch", "--attach"),
    (["session"], "--wait-if-paused", "--sandbox"),
    (["mcp"], "--listen", "--transport http"),
    (["run"], "--audit", "--allow-net"),
    (["ps"], "--tls-ca", "--target"),
    (["audit", "verify"], "--unsigned-tail-ok", "--pubkey"),
])
def test_a_flag_that_acts_only_with_another_says_which_first(verb, flag, needs):
    parser = build_parser()
    for word in verb:
        parser = parser._subparsers._group_actions[0].choices[word]
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    assert action.help.startswith(f"with {needs}: ")
    assert not action.help.startswith(f"with {needs}: with ")
