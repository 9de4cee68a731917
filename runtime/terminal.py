"""What of a sandbox's or a tenant's text may reach the user's terminal.

A sandbox's output, and every string a tenant chose (argv, task progress, audit details),
can hold escape sequences that a terminal obeys: OSC 52 writes the user's clipboard, OSC 0/2
set the window title, DCS/APC strings reach terminal extensions, CSI sequences move the
cursor, erase or query the screen (and some answers are typed back as input), and bidi
overrides (U+202E) make a line read differently from what it holds. Two tools here:

`TerminalFilter` - a streaming filter for output shown as it comes (run, exec, session,
task watch). Sans-IO: `feed(bytes) -> bytes` any split of the input gives the same output,
`flush()` at the end. Rules, in the spirit of `less -R`:

- Kept: text (valid UTF-8), newline, tab, carriage return (progress lines), and SGR
  sequences `ESC [ <digits ; :> m` (colours, bold), which only change how text looks.
- Dropped whole: OSC, DCS, APC, PM and SOS strings (7-bit `ESC ] P _ ^ X` or their C1
  forms) up to their terminator (ST = `ESC \\` or U+009C, BEL for OSC, CAN/SUB cancel);
  every other CSI sequence (7-bit or C1 U+009B, including SGR in the C1 form), every other
  escape sequence (`ESC` + intermediates + final), other C0 controls (BEL, BS, ...), DEL,
  C1 controls (U+0080-U+009F), and the bidi embeddings, overrides and isolates
  (U+202A-U+202E, U+2066-U+2069).
- Bytes that are not UTF-8 become U+FFFD (a raw 0x9B byte is CSI to a Latin-1 terminal).
- A CSI longer than CSI_MAX_CHARS is dropped (its bytes are not kept while it lasts).

`TerminalFilter(tty=True)` - for a program given a terminal (`run -t`, `exec -t`): a
full-screen program must move the cursor, so on top of the above it keeps what only draws:
BS and BEL; cursor moves, erases, insert/delete, scrolling regions and save/restore
(CSI with plain numeric parameters and a final among `@ A-H I J K L M P S T X Z ` a b d e
f g h l m r s u`, cursor shape `CSI n SP q`, soft reset `CSI ! p`); the private modes of
TTY_PRIVATE_MODES (`CSI ? n h/l`: alternate screen, cursor keys, cursor visibility,
autowrap, bracketed paste, mouse and focus reports, all of which only change what the
user's own keys and mouse send to the program); and `ESC 7 8 = > M D E`, `ESC ( 0/B`.
Still dropped: everything that makes the terminal answer (DSR `CSI n`, DA `CSI c`,
`CSI t` window reports, `CSI x`, DECRQM `CSI $ p`, `CSI > ...`, `CSI = ...`, ENQ), every
OSC (titles, OSC 52 clipboard writes, colour queries), DCS, APC, PM and SOS, `ESC c`.
`restore()` gives the sequences that put back every mode the program left changed
(TerminalWriter writes them at close), so the shell after it is usable.

`visible(text)` - for one-line listings (audit records, ps, task fields): nothing is
dropped, every control, format or separator character is shown as an escape (`\\x1b`,
`\\u202e`), so a reader sees what the tenant wrote.

`TerminalWriter` puts the filter in front of a binary stream only when that stream is a
terminal and `--raw` was not given: pipes and files get the bytes unchanged.
"""

from __future__ import annotations

import codecs
import re

#: Longest CSI sequence kept while it is parsed (real SGR sequences are far shorter).
CSI_MAX_CHARS = 256

# Characters that start something the ground state does not copy as they are.
_SPECIAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SGR_PARAMS = re.compile(r"[0-9;:]*")

_GROUND, _ESC, _ESC_INTERMEDIATE, _CSI, _CSI_IGNORE, _STRING, _STRING_ESC = range(7)

_ESC_CHAR = "\x1b"
_BEL, _CAN, _SUB = "\x07", "\x18", "\x1a"
_C1_CSI, _C1_ST = "\x9b", "\x9c"
#: C1 controls that open a string (DCS, SOS, OSC, PM, APC) and their 7-bit finals.
_C1_STRINGS = frozenset("\x90\x98\x9d\x9e\x9f")
_ESC_STRINGS = frozenset("P X ] ^ _".split())
_KEPT_CONTROLS = frozenset("\n\t\r")
_SHORT_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}

#: Under a tty: the controls, CSI finals (plain numeric parameters) and ESC finals kept.
_TTY_CONTROLS = frozenset("\n\t\r\x07\x08")
_TTY_CSI_FINALS = frozenset("@ABCDEFGHIJKLMPSTXZ`abdefghlmrsu")
_TTY_ESC_FINALS = frozenset("78=>MDE")
_TTY_CHARSETS = frozenset(("(0", "(B", ")0", ")B"))
_CSI_NUMERIC = re.compile(r"[0-9;]*")
#: Private modes (`CSI ? n h` / `l`) a program under a tty may set, with the state a
#: terminal starts in (restore() goes back to it).
TTY_PRIVATE_MODES = {1: "l", 7: "h", 12: "l", 25: "h", 47: "l", 1047: "l", 1048: "l",
                     1049: "l", 2004: "l", 1000: "l", 1002: "l", 1003: "l", 1004: "l",
                     1005: "l", 1006: "l", 1015: "l"}


class TerminalFilter:
    """Streaming filter of terminal output (the rules are in the module docstring)."""

    __slots__ = ("_decoder", "_state", "_csi", "_osc", "_tty", "_modes", "_keypad",
                 "_region")

    def __init__(self, *, tty: bool = False) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._state = _GROUND
        self._csi: list[str] = []  # the CSI being parsed (parameters and intermediates)
        self._osc = False  # the string being dropped is an OSC (BEL ends it too)
        self._tty = tty  # a program's terminal: what draws is kept (module docstring)
        self._modes: dict[int, str] = {}  # private modes the program changed, tty only
        self._keypad = False  # ESC = (application keypad) in force
        self._region = False  # a scrolling region was set

    def restore(self) -> bytes:
        """tty: the sequences that undo every mode the program left changed (private
        modes, keypad, scrolling region, colours); empty otherwise."""
        if not self._tty:
            return b""
        out = [f"\x1b[?{mode}{TTY_PRIVATE_MODES[mode]}"
               for mode, state in self._modes.items() if state != TTY_PRIVATE_MODES[mode]]
        if self._keypad:
            out.append("\x1b>")
        if self._region:
            out.append("\x1b[r")
        out.append("\x1b[0m")
        return "".join(out).encode()

    def _keep_csi(self, params: str, final: str, out: list[str]) -> None:
        """Under a tty, CSI params final is copied when it only draws."""
        if params.startswith("?") and final in "hl":
            modes = params[1:].split(";")
            if all(m.isdigit() and int(m) in TTY_PRIVATE_MODES for m in modes):
                for m in modes:
                    self._modes[int(m)] = final
                out.append(f"\x1b[{params}{final}")
            return
        if ((final in _TTY_CSI_FINALS and _CSI_NUMERIC.fullmatch(params))
                or (final == "q" and re.fullmatch(r"[0-9]? ", params))
                or (final == "p" and params == "!")):
            if final == "r":
                self._region = bool(params)
            out.append(f"\x1b[{params}{final}")

    def feed(self, data: bytes) -> bytes:
        """The part of data (after what was fed before) that may reach the terminal."""
        return self._run(self._decoder.decode(data))

    def flush(self) -> bytes:
        """End of the stream: an incomplete UTF-8 sequence becomes U+FFFD; an unfinished
        escape sequence is dropped."""
        out = self._run(self._decoder.decode(b"", final=True))
        self._state = _GROUND
        self._csi.clear()
        return out

    def _run(self, text: str) -> bytes:
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            if self._state == _GROUND:
                match = _SPECIAL.search(text, i)
                end = match.start() if match else n
                if end > i:
                    out.append(text[i:end])
                if match is None:
                    break
                i = end
            self._step(text[i], out)
            i += 1
        return "".join(out).encode("utf-8")

    def _step(self, c: str, out: list[str]) -> None:  # noqa: C901 (one state machine)
        state = self._state
        if state == _GROUND:
            if c == _ESC_CHAR:
                self._state = _ESC
            elif c == _C1_CSI:
                self._csi.clear()
                self._state = _CSI_IGNORE  # the C1 form is never kept, SGR included
            elif c in _C1_STRINGS:
                self._osc = c == "\x9d"
                self._state = _STRING
            elif c in _KEPT_CONTROLS or (self._tty and c in _TTY_CONTROLS):
                out.append(c)
            # else: another C0 or C1 control, DEL or a bidi control: dropped
        elif state == _ESC:
            if c == "[":
                self._csi.clear()
                self._state = _CSI
            elif c in _ESC_STRINGS:
                self._osc = c == "]"
                self._state = _STRING
            elif "\x20" <= c <= "\x2f":
                self._csi[:] = [c]
                self._state = _ESC_INTERMEDIATE
            elif "\x30" <= c <= "\x7e":
                # a two-character sequence (ESC c, ESC 7 ...): dropped but under a tty
                if self._tty and c in _TTY_ESC_FINALS:
                    out.append(_ESC_CHAR + c)
                    if c in "=>":
                        self._keypad = c == "="
                self._state = _GROUND
            elif c == _ESC_CHAR:
                pass  # ESC ESC: the second one starts the sequence
            else:
                self._state = _GROUND  # not a sequence after all: the character decides
                self._step(c, out)
        elif state == _ESC_INTERMEDIATE:
            if "\x30" <= c <= "\x7e":
                if self._tty and len(self._csi) == 1 and self._csi[0] + c in _TTY_CHARSETS:
                    out.append(_ESC_CHAR + self._csi[0] + c)
                self._csi.clear()
                self._state = _GROUND
            elif not "\x20" <= c <= "\x2f":
                self._state = _GROUND
                self._step(c, out)
        elif state in (_CSI, _CSI_IGNORE):
            if "\x40" <= c <= "\x7e":  # the final character
                if (state == _CSI and c == "m"
                        and _SGR_PARAMS.fullmatch(params := "".join(self._csi))):
                    out.append(f"\x1b[{params}m")
                elif state == _CSI and self._tty:
                    self._keep_csi("".join(self._csi), c, out)
                self._csi.clear()
                self._state = _GROUND
            elif "\x20" <= c <= "\x3f":  # parameters and intermediates
                if state == _CSI:
                    if len(self._csi) >= CSI_MAX_CHARS:
                        self._csi.clear()
                        self._state = _CSI_IGNORE
                    else:
                        self._csi.append(c)
            else:  # anything else cancels the sequence and is itself looked at
                self._csi.clear()
                self._state = _GROUND
                self._step(c, out)
        elif state == _STRING:
            if c == _ESC_CHAR:
                self._state = _STRING_ESC
            elif c == _C1_ST or c in (_CAN, _SUB) or (c == _BEL and self._osc):
                self._state = _GROUND
        elif state == _STRING_ESC:
            # ESC \ is ST; ESC and anything else ends the string and starts a sequence
            self._state = _GROUND if c == "\\" else _ESC
            if c != "\\":
                self._step(c, out)


class TerminalWriter:
    """write(bytes) to a binary stream, filtered when it is a terminal and raw is False
    (program_tty: the program has a terminal of its own; see TerminalFilter(tty=True))."""

    def __init__(self, stream, *, raw: bool = False, program_tty: bool = False) -> None:
        self.stream = stream
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.filter = TerminalFilter(tty=program_tty) if tty and not raw else None

    def write(self, data: bytes) -> None:
        if self.filter is not None:
            data = self.filter.feed(data)
        if data:
            self.stream.write(data)
            self.stream.flush()

    def close(self) -> None:
        """The stream ended: what the filter still held (an incomplete character) goes out."""
        if self.filter is not None:
            tail = self.filter.flush() + self.filter.restore()
            if tail:
                self.stream.write(tail)
                self.stream.flush()


def visible(text: str, *, short_escapes: bool = True) -> str:
    """text with every control, format and separator character (newlines, tabs, ESC, C1,
    bidi controls, U+2028) written as a Python-style escape; the ASCII space is kept.
    short_escapes=False writes \x0a for a newline (and so on) instead of \n: the audit
    trail's printed form, which must not change."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif short_escapes and c in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[c])
        else:
            n = ord(c)
            out.append(f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000
                       else f"\\U{n:08x}")
    return "".join(out)
