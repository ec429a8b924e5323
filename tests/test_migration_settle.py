"""Settling a commit lost in flight, decided step by step with scripted answers from the other VMM, and the exact
words the migration code puts in front of an operator. Pure: no KVM, no sockets (the sides are given stand-ins
for what these paths do not touch)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from pvmit.migration.destination import Arrival, Incoming, Receiver
from pvmit.migration.fields import checked, need
from pvmit.migration.ledger import Ledger
from pvmit.migration.source import Outcome, Outgoing
from pvmit.migration.stream import (
    PAGE,
    Section,
    StreamDecoder,
    StreamError,
    Unusable,
    decode_pages,
    encode_header,
    encode_json,
    encode_section,
    loads,
)
from pvmit.migration.transport import Channel
from pvmit.net.address import Address

M = "0123456789abcdef0123456789abcdef"


def script(*answers: str) -> tuple[Callable[..., str], list[tuple[Any, ...]]]:
    """An `ask` that gives `answers` in turn (the last one for ever after), and the calls it got."""
    calls: list[tuple[Any, ...]] = []

    def ask(*args: Any) -> str:
        calls.append(args)
        return answers[min(len(calls) - 1, len(answers) - 1)]

    return ask, calls


# --- the source, decided commit, no CACK ------------------------------------------------------------------------------
def outgoing(ask: Callable[..., str], notice: float = 60.0) -> tuple[Outgoing, list[str], list[str], Ledger]:
    said: list[str] = []
    doubts: list[str] = []
    led = Ledger()
    led.decide(M, "committed", "REDY received")
    out = Outgoing(None, Address.parse("unix:/dst.mig"), None,  # type: ignore[arg-type]
                   header={"migration": M, "mode": "pre-copy", "vm_id": "ab"}, hello={}, ledger=led,
                   pause=time.monotonic, ask=ask, progress=said.append, on_doubt=doubts.append,
                   settle_notice=notice)
    return out, said, doubts, led


def test_source_lets_go_when_the_destination_runs_the_guest() -> None:
    ask, calls = script("prepared", "committed")
    o, said, doubts, led = outgoing(ask)
    out = o._settle(o.out, "unix:/dst.ctl")
    assert out.migrated and not out.in_doubt and out.committed_at is not None
    assert out.settled_by == "the destination's VMM says it runs the guest"
    assert said[-1] == "committed: the destination's VMM says it runs the guest"
    assert calls == [("unix:/dst.ctl", M, "committed")] * 2  # it tells its decision each time it asks
    assert led.phase(M) == "committed" and doubts == []


@pytest.mark.parametrize("answer,why", [
    ("unknown", "the destination's VMM knows nothing of it (its process is gone)"),
    ("gone", "nothing listens at the destination's control socket (its VMM is gone)"),
    ("aborted", "the destination's operator discarded its copy"),
])
def test_source_resumes_when_no_living_destination_has_the_guest(answer: str, why: str) -> None:
    o, said, _, led = outgoing(script(answer)[0])
    out = o._settle(o.out, "unix:/dst.ctl")
    assert not out.migrated and not out.in_doubt and out.settled_by == why
    assert out.reason == f"the commit did not reach a living destination: {why}"
    assert said[-1] == out.reason + "; the guest resumes on the source"
    assert led.phase(M) == "aborted" and led.how(M) == why


def test_source_in_doubt_tells_the_operator_once_and_takes_their_word() -> None:
    ask, calls = script("unreachable")
    o, said, doubts, led = outgoing(ask, notice=0.0)

    def operator(*args: Any) -> str:
        if len(calls) == 2:
            o.operator = "run"
        return ask(*args)

    o.ask = operator
    out = o._settle(o.out, "unix:/dst.ctl")
    assert len(doubts) == 1 and doubts[0] == out.reason
    assert doubts[0].startswith(f"IN DOUBT: migration {M} to unix:/dst.mig: committed, but the destination's VMM at "
                                "unix:/dst.ctl cannot be reached; the guest is paused here.")
    assert "`pvmit ctl SOURCE resolve discard`" in doubts[0] and "`pvmit ctl SOURCE resolve run`" in doubts[0]
    assert not out.migrated and not out.in_doubt and out.settled_by == "the operator said run"
    assert led.phase(M) == "aborted" and led.how(M) == "the operator said run"


def test_source_without_the_destinations_address_asks_no_one() -> None:
    ask, calls = script("committed")
    o, _, doubts, led = outgoing(ask, notice=0.0)
    o.operator = "discard"
    out = o._settle(o.out, "")
    assert out.migrated and out.settled_by == "the operator said discard" and calls == []
    assert led.phase(M) == "committed"


def test_outcome_as_json() -> None:
    o = Outcome(True, True, "pre-copy", M, "ab", "why", {"accepted": True}, {"forced": []}, 2, 10, 3, 999, 0.123456,
                1.5, 2.5, False, "CACK")
    assert o.to_json() == {
        "migrated": True, "accepted": True, "mode": "pre-copy", "migration": M, "vm": "ab", "reason": "why",
        "verdict": {"accepted": True}, "ready": {"forced": []}, "rounds": 2, "pages_sent": 10, "zero_pages": 3,
        "bytes_sent": 999, "total_seconds": 0.1235, "paused_at": 1.5, "committed_at": 2.5, "in_doubt": False,
        "settled_by": "CACK", "guest": "running on the destination"}
    in_doubt = Outcome(False, True, "x", in_doubt=True).to_json()["guest"]
    assert in_doubt == "paused on the source, in doubt: see the reason"
    assert Outcome(False, False, "x").to_json()["guest"] == "still running on the source"


# --- the destination, REDY sent, no CMIT ------------------------------------------------------------------------------
def receiver(ask: Callable[..., str], notice: float = 60.0, source_control: str = "unix:/src.ctl"
             ) -> tuple[Receiver, Incoming, list[str], Ledger]:
    said: list[str] = []
    led = Ledger()
    led.prepared(M)
    r = Receiver(None, None, None, None, ledger=led, control="unix:/dst.ctl", ask=ask,  # type: ignore[arg-type]
                 progress=said.append, settle_notice=notice)
    inc = Incoming(None, None, 0, "Ice Lake", {}, M, "ab", source_control)  # type: ignore[arg-type]
    return r, inc, said, led


@pytest.mark.parametrize("answer,why", [
    ("committed", "the source's VMM says it committed"),
    ("unknown", "the source's VMM knows nothing of it: the process that had the guest is gone"),
    ("gone", "nothing listens at the source's control socket: its VMM is gone"),
])
def test_destination_runs_the_guest_on_the_sources_word_or_when_it_is_gone(answer: str, why: str) -> None:
    ask, calls = script("deciding", answer)
    r, inc, _, led = receiver(ask)
    assert r._settle(inc) is True
    assert r.arrival.settled_by == why and led.phase(M) == "committed" and led.how(M) == why
    assert calls == [("unix:/src.ctl", M)] * 2


def test_destination_drops_its_copy_when_the_source_kept_the_guest() -> None:
    r, inc, _, led = receiver(script("aborted")[0])
    assert r._settle(inc) is False
    assert led.phase(M) == "aborted" and r.arrival.settled_by == "the source's VMM says it kept the guest"


def test_destination_told_by_the_source_needs_not_ask() -> None:
    ask, calls = script("committed")
    r, inc, _, led = receiver(ask)
    led.answer(M, "committed")  # the source's VMM, asking us, told us first
    assert r._settle(inc) is True and calls == []
    assert r.arrival.settled_by == "the source's VMM said committed"


def test_destination_in_doubt_tells_the_operator_once_and_takes_their_word() -> None:
    ask, calls = script("unreachable")
    r, inc, said, led = receiver(ask, notice=0.0)

    def operator(*args: Any) -> str:
        if len(calls) == 2:
            led.commit(M, "the operator (uid 0) said run")
        return ask(*args)

    r.ask = operator
    assert r._settle(inc) is True and r.arrival.settled_by == "the operator (uid 0) said run"
    doubts = [s for s in said if s.startswith("IN DOUBT")]
    assert len(doubts) == 1
    assert doubts[0].startswith(f"IN DOUBT: migration {M} from Ice Lake: the source's VMM at unix:/src.ctl cannot "
                                "be reached; the guest is held here, not running.")
    assert "`pvmit ctl unix:/dst.ctl resolve run`" in doubts[0]
    assert "`pvmit ctl unix:/dst.ctl resolve discard`" in doubts[0]


def test_destination_without_the_sources_address_asks_no_one() -> None:
    ask, calls = script("committed")
    r, inc, said, led = receiver(ask, notice=0.0, source_control="")

    def later() -> None:
        time.sleep(0.3)
        led.abort(M, "the operator said discard")

    import threading
    threading.Thread(target=later).start()
    assert r._settle(inc) is False and calls == []
    assert "(unknown address)" in said[0]


def test_a_commit_for_another_migration_does_not_commit_this_one() -> None:
    a, b = socket.socketpair()
    r, inc, said, led = receiver(script("committed")[0])
    r.chan = Channel(b, expect_header=False)
    r.commit_wait = 5
    a.sendall(encode_json(b"CMIT", {"migration": "f" * 32}))
    assert r._commit_from_stream(inc) is False
    assert said[-1].startswith("the connection ended after REDY without the commit (CMIT section: it commits another "
                               "migration")
    assert said[-1].endswith("asking the source's VMM how it decided") and led.phase(M) == "prepared"
    a.sendall(encode_json(b"CMIT", {"migration": M}))
    assert r._commit_from_stream(inc) is True and r.arrival.settled_by == "CMIT" and led.how(M) == "CMIT"
    cack = Channel(a, expect_header=False).expect(b"CACK")
    assert isinstance(cack, Section) and cack.json() == {"migration": M}
    led.prepared("e" * 32)
    led.abort("e" * 32, "x")
    inc2 = Incoming(None, None, 0, "s", {}, "e" * 32, "ab", "")  # type: ignore[arg-type]
    a.sendall(encode_json(b"CMIT", {"migration": "e" * 32}))
    assert r._commit_from_stream(inc2) is False and r.arrival.settled_by == "CMIT arrived after aborted"
    a.close()
    b.close()


def test_a_refusal_sends_its_reason_and_drops_the_guest() -> None:
    a, b = socket.socketpair()
    said: list[str] = []
    r = Receiver(Channel(b, expect_header=False), None, None, None, ledger=Ledger(),  # type: ignore[arg-type]
                 control="", ask=lambda *x: "x", progress=said.append)
    arrival = r._nack("no room")
    assert isinstance(arrival, Arrival) and arrival.vmm is None and arrival.reason == "refused: no room"
    assert said == ["refused: no room"] and r.vmm is None
    nack = Channel(a, expect_header=False).expect(b"NACK")
    assert isinstance(nack, Section) and nack.json() == {"reason": "no room"}
    a.close()
    b.close()


# --- the ledger -------------------------------------------------------------------------------------------------------
def test_ledger_aborts_a_prepared_migration_and_answers_only_a_destinations_decision() -> None:
    led = Ledger()
    led.prepared("p")
    assert led.abort("p", "the source kept it") and led.phase("p") == "aborted" and led.how("p") == "the source kept it"
    assert not led.commit("p", "late") and led.how("p") == "the source kept it"
    assert led.role("p") == "destination" and led.role("nothing") == "" and led.how("nothing") == ""
    led.start("s")
    led.answer("s", "aborted")
    assert led.phase("s") == "deciding"  # a source is never told by its peer
    led.prepared("q")
    led.answer("q", "deciding")
    assert led.phase("q") == "prepared"  # only a decision settles
    assert led.answer("q", "committed") == {"role": "destination", "state": "committed"}
    assert led.how("q") == "the source's VMM said committed"


# --- the words and rules of the stream --------------------------------------------------------------------------------
@pytest.mark.parametrize("value,shown", [
    (None, "null"), (True, "true"), (False, "false"), (7, "7"), (1.5, "1.5"), ("x" * 5, "a string ('xxxxx')"),
    ([1], "a JSON list"), ({"a": 1}, "a JSON object"), (Unusable("Infinity"), "the number Infinity"),
    (10 ** 50, "1" + "0" * 39 + "... (51 characters)"),
    ("y" * 100, "a string ('" + "y" * 59 + "... (102 characters))"),
    (b"b", "a JSON bytes"),
])
def test_how_a_wrong_value_is_described(value: Any, shown: str) -> None:
    kind, wanted = (list, "a list") if isinstance(value, dict) else (dict, "an object")
    with pytest.raises(StreamError) as e:
        checked(value, "f", kind, where="here")
    assert str(e.value) == f"here: f must be {wanted}, not {shown}"


def test_field_paths_and_ranges() -> None:
    doc = {"a": {"b": 5, "s": "\ud800"}}
    assert need(doc, "a.b", int, lo=5, hi=5) == 5
    with pytest.raises(StreamError, match=r"^migration stream header: a.b = 5 is out of range 6..inf$"):
        need(doc, "a.b", int, lo=6)
    with pytest.raises(StreamError, match=r"^w: a.b = 5 is out of range -inf..4$"):
        need(doc, "a.b", int, hi=4, where="w")
    with pytest.raises(StreamError, match=r"^w: field a.c is missing$"):
        need(doc, "a.c", int, where="w")
    with pytest.raises(StreamError, match=r"^w: a.b must be an object, not 5$"):
        need(doc, "a.b.c", int, where="w")
    with pytest.raises(StreamError, match=r"^w: a.s holds an unpaired surrogate"):
        need(doc, "a.s", str, where="w")
    with pytest.raises(StreamError, match=r"^w: a.s is longer than 0 characters$"):
        need(doc, "a.s", str, where="w", max_len=0)


@pytest.mark.parametrize("text,kept", [("9" * 40, "9" * 40), ("9" * 41, "9" * 20 + "... (41 characters)")])
def test_unusable_numbers_keep_a_short_text(text: str, kept: str) -> None:
    assert Unusable(text).text == kept and repr(Unusable(text)) == f"the number {kept}"
    assert loads(f'{{"n": {text}e999}}', "t")["n"].text == Unusable(text + "e999").text


def test_only_non_finite_floats_become_unusable() -> None:
    doc = loads(b'{"a": 1.5, "b": 1e308, "c": 1e309, "d": 12345678901234567890}', "t")
    assert doc["a"] == 1.5 and doc["b"] == 1e308 and isinstance(doc["c"], Unusable)
    assert doc["d"] == 12345678901234567890


def test_decoder_positions_and_messages() -> None:
    head = encode_header({"x": 1})
    sec = encode_json(b"HELO", {"a": 1})
    d = StreamDecoder()
    d.feed(head + sec)
    assert d.next_event() is not None
    s = d.next_event()
    assert isinstance(s, Section) and s.offset == len(head)
    d.feed(sec[:5])
    assert d.next_event() is None
    with pytest.raises(StreamError, match=rf"^truncated stream: the peer closed inside a section at byte "
                                          rf"{len(head) + len(sec)} \(5 bytes of it received\)$"):
        d.end()
    d = StreamDecoder()
    d.feed(head[:10])
    assert d.next_event() is None
    with pytest.raises(StreamError, match=r"^truncated stream: the peer closed inside a header at byte 0 "):
        d.end()
    d = StreamDecoder()
    d.feed(b"PVMITMIX")
    with pytest.raises(StreamError, match=r"^not a pvmit migration stream \(bad magic\)$"):
        d.next_event()
    d = StreamDecoder(expect_header=False)
    bad = bytearray(sec)
    bad[-1] ^= 1
    d.feed(bytes(sec) + bytes(bad))
    assert d.next_event().offset == 0  # type: ignore[union-attr]
    with pytest.raises(StreamError, match=rf"^HELO section at byte {len(sec)}: checksum mismatch \(corrupted\)$"):
        d.next_event()
    d = StreamDecoder(expect_header=False)
    d.feed(encode_section(b"DONE", b"{}")[:12])
    assert d.next_event() is None


def test_memory_pages_of_no_page_and_too_short() -> None:
    assert decode_pages(Section(b"MEMP", (3).to_bytes(8, "little") + bytes(4), 0))[0] == 3
    with pytest.raises(StreamError, match=r"^MEMP section at byte 7: shorter than its own header$"):
        decode_pages(Section(b"MEMP", bytes(11), 7))
    first, data = decode_pages(Section(b"MEMP", (2).to_bytes(8, "little") + (1).to_bytes(4, "little") +
                                       bytes(PAGE), 0))
    assert first == 2 and len(data) == PAGE


def test_vcpu_state_blobs_are_bounded_before_decoding() -> None:
    import ctypes as C

    from pvmit.kvm import abi
    from pvmit.migration.vmstate import _unblob
    size = C.sizeof(abi.KvmFpu)
    with pytest.raises(StreamError, match=rf"^CPUS section: fpu must be a base64 string of {size} bytes$"):
        _unblob(None, abi.KvmFpu, "fpu")
    with pytest.raises(StreamError, match=rf"^CPUS section: fpu must be a base64 string of {size} bytes$"):
        _unblob("A" * (4 * size + 1), abi.KvmFpu, "fpu")
    with pytest.raises(StreamError, match=rf"^CPUS section: fpu has {3 * size} bytes, expected {size}$"):
        _unblob("A" * (4 * size), abi.KvmFpu, "fpu")  # at the bound: decoded, then refused for its size
    with pytest.raises(StreamError, match=r"^CPUS section: fpu is not base64$"):
        _unblob("!" * 8, abi.KvmFpu, "fpu")
    import base64
    assert bytes(_unblob(base64.b64encode(bytes(size)).decode(), abi.KvmFpu, "fpu")) == bytes(size)
