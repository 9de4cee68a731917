"""TerminalFilter and visible(): every case fed whole, byte by byte and at every split."""

from __future__ import annotations

import io

import pytest

from corral.runtime.terminal import CSI_MAX_CHARS, TerminalFilter, TerminalWriter, visible

ESC = b"\x1b"
C1_CSI = "\u009b".encode()  # b"\xc2\x9b"
RLO = "\u202e".encode()

# (name, input, what reaches the terminal)
CASES = [
    ("plain text", b"hello, world\n", b"hello, world\n"),
    ("tabs, CR and newlines", b"a\tb\r\nc\rd\n", b"a\tb\r\nc\rd\n"),
    ("UTF-8 text", "héllo → 世界 🐍\n".encode(), "héllo → 世界 🐍\n".encode()),
    ("SGR colour kept", b"\x1b[31mred\x1b[0m \x1b[1;38;5;208mx\x1b[m",
     b"\x1b[31mred\x1b[0m \x1b[1;38;5;208mx\x1b[m"),
    ("SGR with colon sub-parameters kept", b"\x1b[38:2:1:2:3mx", b"\x1b[38:2:1:2:3mx"),
    ("OSC 52 clipboard write dropped", b"a\x1b]52;c;ZWNobyBwd25lZAo=\x07b", b"ab"),
    ("OSC title with ST dropped", b"a\x1b]0;evil title\x1b\\b", b"ab"),
    ("OSC 8 hyperlink dropped", b"\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", b"link"),
    ("C1 OSC dropped up to C1 ST", "a\u009d0;t\u009cb".encode(), b"ab"),
    ("DCS dropped", b"a\x1bP+q544e\x1b\\b", b"ab"),
    ("APC and PM and SOS dropped", b"1\x1b_apc\x1b\\2\x1b^pm\x1b\\3\x1bXsos\x1b\\4", b"1234"),
    ("BEL does not end a DCS", b"a\x1bPx\x07y\x1b\\b", b"ab"),
    ("CAN cancels a string", b"a\x1b]0;t\x18b", b"ab"),
    ("ESC inside a string starts a new sequence", b"a\x1b]0;t\x1b[31mb", b"a\x1b[31mb"),
    ("cursor movement dropped", b"a\x1b[2J\x1b[H\x1b[10;20Hb\x1b[?25l", b"ab"),
    ("private SGR-like dropped", b"a\x1b[>4;1mb\x1b[?1m", b"ab"),
    ("SGR with intermediate dropped", b"a\x1b[1 mb", b"ab"),
    ("device status query dropped", b"a\x1b[6nb\x1b[cc", b"abc"),
    ("C1 CSI dropped, SGR too", b"a" + C1_CSI + b"2J" + C1_CSI + b"31mb", b"ab"),
    ("two-character escapes dropped", b"a\x1bcb\x1b7c\x1b8d\x1b=e", b"abcde"),
    ("charset designation dropped", b"a\x1b(0b\x1b)Bc", b"abc"),
    ("ESC ESC", b"a\x1b\x1b[31mb", b"a\x1b[31mb"),
    ("other C0 and DEL dropped", b"a\x07b\x08c\x00d\x0be\x0cf\x7fg\x05h", b"abcdefgh"),
    ("C1 controls dropped", "a\u0085b\u0080c\u009cd\u0096e".encode(), b"abcde"),
    ("bidi overrides and isolates dropped",
     b"a" + RLO + "b\u202ac\u202bd\u202ce\u202df\u2066g\u2067h\u2068i\u2069j".encode(),
     b"abcdefghij"),
    ("invalid UTF-8 replaced", b"a\x9b2Jb\xffc", "a\ufffd2Jb\ufffdc".encode()),
    ("control inside CSI cancels it, and is looked at", b"a\x1b[3\nb", b"a\nb"),
    ("overlong CSI dropped whole", b"a\x1b[" + b"1;" * CSI_MAX_CHARS + b"mb", b"ab"),
    ("unterminated OSC drops the rest", b"a\x1b]52;c;AAAA", b"a"),
]


def _whole(data: bytes) -> bytes:
    f = TerminalFilter()
    return f.feed(data) + f.flush()


def _bytewise(data: bytes) -> bytes:
    f = TerminalFilter()
    return b"".join(f.feed(data[i:i + 1]) for i in range(len(data))) + f.flush()


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=[c[0] for c in CASES])
def test_filter_whole(name, data, expected):
    assert _whole(data) == expected


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=[c[0] for c in CASES])
def test_filter_byte_by_byte(name, data, expected):
    assert _bytewise(data) == expected


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=[c[0] for c in CASES])
def test_filter_split_anywhere(name, data, expected):
    for cut in range(len(data) + 1):
        f = TerminalFilter()
        assert f.feed(data[:cut]) + f.feed(data[cut:]) + f.flush() == expected, cut


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=[c[0] for c in CASES])
def test_filter_with_text_after(name, data, expected):
    # whatever a case leaves open is closed by flush(); a case that ends cleanly lets
    # what follows through
    if name == "unterminated OSC drops the rest":
        assert _whole(data + b"tail\n") == b"a"
    else:
        assert _whole(data + b"tail\n") == expected + b"tail\n"


def test_incomplete_character_at_the_end_becomes_replacement():
    f = TerminalFilter()
    assert f.feed("é".encode()[:1]) == b""
    assert f.flush() == "\ufffd".encode()


def test_writer_passes_bytes_unchanged_when_not_a_terminal():
    out = io.BytesIO()
    w = TerminalWriter(out)
    data = b"\x1b]52;c;AAAA\x07" + RLO + b"\xff"
    w.write(data)
    w.close()
    assert out.getvalue() == data


class _Tty(io.BytesIO):
    def isatty(self) -> bool:
        return True


def test_writer_filters_a_terminal_unless_raw():
    out = _Tty()
    w = TerminalWriter(out)
    w.write(b"a\x1b]0;t\x07b\xc3")
    w.close()
    assert out.getvalue() == "ab\ufffd".encode()
    raw = _Tty()
    w = TerminalWriter(raw, raw=True)
    w.write(b"a\x1b]0;t\x07b")
    assert raw.getvalue() == b"a\x1b]0;t\x07b"


@pytest.mark.parametrize(("text", "shown"), [
    ("plain words", "plain words"),
    ("rm \u202eexe.txt", "rm \\u202eexe.txt"),
    ("\u009b2J", "\\x9b2J"),
    ("\x1b]52;c;AA\x07", "\\x1b]52;c;AA\\x07"),
    ("two\nlines\ttab", "two\\nlines\\ttab"),
    ("\u2066iso\u2069 \u2028", "\\u2066iso\\u2069 \\u2028"),
    ("é世🐍", "é世🐍"),
])
def test_visible(text, shown):
    assert visible(text) == shown


def test_run_egress_lines_show_the_sandbox_chosen_name_escaped(monkeypatch, capsys):
    from corral.runtime.cli import run as run_verb
    from corral.sandbox import proxy

    class FakeProxy:
        default_on_event = None

    fake = FakeProxy()
    monkeypatch.setattr(proxy, "shared_proxy", lambda: fake)
    run_verb.report_egress(None)
    fake.default_on_event({"decision": "deny", "mode": "connect", "port": 443,
                           "name": "evil\x1b]0;owned\x07\u202e.com", "reason": "no rule"})
    assert capsys.readouterr().err == (
        "corral: egress deny connect evil\\x1b]0;owned\\x07\\u202e.com:443 (no rule)\n")


# -- a program with a terminal of its own (run -t, exec -t) ---------------------------------

# (name, input, what reaches the terminal)
TTY_CASES = [
    ("text and controls that only draw", b"a\tb\r\nc\x08d\x07", b"a\tb\r\nc\x08d\x07"),
    ("cursor moves, erases, scrolling region kept",
     b"\x1b[2J\x1b[H\x1b[10;20H\x1b[K\x1b[3A\x1b[2;20r\x1b[5@\x1b[s\x1b[u",
     b"\x1b[2J\x1b[H\x1b[10;20H\x1b[K\x1b[3A\x1b[2;20r\x1b[5@\x1b[s\x1b[u"),
    ("alternate screen, cursor keys, bracketed paste kept",
     b"\x1b[?1049h\x1b[?1h\x1b[?2004h\x1b[?25l", b"\x1b[?1049h\x1b[?1h\x1b[?2004h\x1b[?25l"),
    ("cursor shape and soft reset kept", b"\x1b[2 q\x1b[!p", b"\x1b[2 q\x1b[!p"),
    ("save/restore cursor, keypad, line drawing kept", b"\x1b7\x1b8\x1b=\x1b(0q\x1b(B",
     b"\x1b7\x1b8\x1b=\x1b(0q\x1b(B"),
    ("queries dropped", b"a\x1b[6nb\x1b[cc\x1b[>cd\x1b[18te\x1b[?2004$pf\x1b[=cg\x05h",
     b"abcdefgh"),
    ("an unknown private mode dropped", b"a\x1b[?9999hb\x1b[?1049;9999hc", b"abc"),
    ("OSC 52, titles, DCS and full reset still dropped",
     b"a\x1b]52;c;aGk=\x07b\x1b]0;t\x1b\\c\x1bP$qm\x1b\\d\x1bce", b"abcde"),
]


@pytest.mark.parametrize(("name", "data", "shown"), TTY_CASES, ids=[c[0] for c in TTY_CASES])
def test_tty_filter_keeps_drawing_and_drops_answers(name, data, shown):
    whole = TerminalFilter(tty=True)
    assert whole.feed(data) + whole.flush() == shown
    bytewise = TerminalFilter(tty=True)
    assert b"".join(bytewise.feed(data[i:i + 1]) for i in range(len(data))) \
        + bytewise.flush() == shown
    for cut in range(len(data) + 1):
        split = TerminalFilter(tty=True)
        assert split.feed(data[:cut]) + split.feed(data[cut:]) + split.flush() == shown


def test_tty_filter_restores_the_modes_the_program_left():
    f = TerminalFilter(tty=True)
    f.feed(b"\x1b[?1049h\x1b[?25l\x1b[?2004h\x1b[?2004l\x1b=\x1b[1;10r")
    assert f.restore() == b"\x1b[?1049l\x1b[?25h\x1b>\x1b[r\x1b[0m"
    assert TerminalFilter(tty=True).restore() == b"\x1b[0m"
    assert TerminalFilter().restore() == b""


def test_the_audit_trail_prints_hex_escapes_where_the_terminal_filter_prints_short_ones():
    from corral.runtime.audit import _printable
    from corral.runtime.terminal import visible

    text = "a\nb\t\x1b[31m\u202e\u2028 é\U0001F600"
    assert _printable(text) == "a\\x0ab\\x09\\x1b[31m\\u202e\\u2028 é\U0001F600"
    assert visible(text) == "a\\nb\\t\\x1b[31m\\u202e\\u2028 é\U0001F600"
    assert _printable("plain text") == "plain text"
