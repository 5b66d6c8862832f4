#!/usr/bin/python3
"""Random operations over NBD with libnbd, checked against an in-memory model.

The generator is block-core's (block-core/tests/conformance/random.rs), ported: disjoint
requests over a window of a few clusters, all in flight at once (libnbd's aio calls), writes
(some of zeroes), write-zeroes with and without NO_HOLE and FAST_ZERO, trims, reads, flushes.
Resizes are left to block-core's run (an NBD client cannot resize).

usage: random_ops.py URI SEED BATCHES UNIT MODEL_IN MODEL_OUT
MODEL_IN holds what the image holds at the start; MODEL_OUT receives what it must hold at the
end (every byte settled by a final read), for `qemu-img compare`.
"""

import errno
import os
import sys

import nbd

MASK = (1 << 64) - 1
# RANDOM_OPS_TRACE=1 prints every batch on stderr, to follow a replayed failure.
TRACE = bool(os.environ.get("RANDOM_OPS_TRACE"))


class Rng:
    """splitmix64, as in random.rs."""

    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        return self.next() % n

    def chance(self, num, den):
        return self.below(den) < num

    def bytes(self, n):
        out = bytearray()
        while len(out) < n:
            out += self.next().to_bytes(8, "little")
        return bytes(out[:n])


def cut(rng, start, end, unit):
    align = [1, 512, min(4096, unit), unit][rng.below(4)]
    at = start + rng.below(end - start + 1)
    return min(max(at - (at - start) % align, start), end)


def batch(rng, size, unit):
    units = 1 + rng.below(8)
    span = min(units * unit, size)
    if rng.chance(1, 8):
        start = size - span
    else:
        start = rng.below((size - span) // unit + 1) * unit
    end = start + span
    pieces = 1 + rng.below(24)
    cuts = sorted(set([cut(rng, start, end, unit) for _ in range(pieces)] + [start, end]))
    ops = []
    for a, b in zip(cuts, cuts[1:]):
        offset, length = a, b - a
        k = rng.below(20)
        if k <= 6:
            data = bytes(length) if rng.chance(1, 4) else rng.bytes(length)
            ops.append(("write", offset, length, data, rng.chance(1, 8)))
        elif k <= 11:
            fua = rng.chance(1, 8)
            may_unmap = rng.chance(1, 2)
            fast = rng.chance(1, 4)
            ops.append(("zero", offset, length, (fua, may_unmap, fast), False))
        elif k <= 15:
            ops.append(("read", offset, length, None, False))
        elif k <= 17:
            ops.append(("trim", offset, length, None, False))
    if rng.chance(1, 10):
        ops.append(("flush", 0, 0, None, False))
    return ops


class Model:
    def __init__(self, data):
        self.data = bytearray(data)
        self.maybe_zero = bytearray(len(data))

    def set(self, offset, data):
        self.data[offset:offset + len(data)] = data
        self.maybe_zero[offset:offset + len(data)] = bytes(len(data))

    def zero(self, offset, length):
        self.data[offset:offset + length] = bytes(length)
        self.maybe_zero[offset:offset + length] = bytes(length)

    def discard(self, offset, length):
        self.maybe_zero[offset:offset + length] = b"\x01" * length

    def check(self, offset, got):
        """Returns None, or the first wrong byte as (offset, got, expected)."""
        step = 4096
        for s in range(0, len(got), step):
            a, b = offset + s, offset + min(s + step, len(got))
            if self.data[a:b] == got[s:s + (b - a)]:
                self.maybe_zero[a:b] = bytes(b - a)
                continue
            for i in range(a, b):
                g = got[i - offset]
                if g == self.data[i] or (self.maybe_zero[i] and g == 0):
                    self.data[i] = g
                    self.maybe_zero[i] = 0
                else:
                    return (i, g, self.data[i])
        return None


def main():
    uri, seed, batches, unit, model_in, model_out = sys.argv[1:7]
    seed, batches, unit = int(seed), int(batches), int(unit)
    with open(model_in, "rb") as f:
        model = Model(f.read())
    rng = Rng(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    assert size == len(model.data), f"export size {size}, model {len(model.data)}"
    fast_zero = h.can_fast_zero()
    for b in range(batches):
        if rng.chance(1, 40):
            # block-core resizes here; keep the sequence of draws the same.
            rng.below(size // 4)
            rng.chance(1, 2)
            continue
        ops = batch(rng, size, unit)
        if TRACE:
            for op in ops:
                print(f"batch {b}: {op[0]} {op[1]}+{op[2]} {op[3] if op[0] == 'zero' else ''}",
                      file=sys.stderr)
        cookies = []
        for kind, offset, length, arg, fua in ops:
            if kind == "read":
                buf = nbd.Buffer(length)
                cookies.append((h.aio_pread(buf, offset), buf))
            elif kind == "write":
                flags = nbd.CMD_FLAG_FUA if fua else 0
                cookies.append((h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(arg)), offset,
                                             flags=flags), None))
            elif kind == "zero":
                zfua, may_unmap, fast = arg
                flags = (nbd.CMD_FLAG_FUA if zfua else 0) | \
                    (0 if may_unmap else nbd.CMD_FLAG_NO_HOLE) | \
                    (nbd.CMD_FLAG_FAST_ZERO if fast and fast_zero else 0)
                cookies.append((h.aio_zero(length, offset, flags=flags), None))
            elif kind == "trim":
                cookies.append((h.aio_trim(length, offset), None))
            else:
                cookies.append((h.aio_flush(), None))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for (kind, offset, length, arg, fua), (cookie, buf) in zip(ops, cookies):
            try:
                h.aio_command_completed(cookie)
            except nbd.Error as e:
                if kind == "zero" and arg[2] and fast_zero and e.errnum == errno.ENOTSUP:
                    # A fast zero that failed may have zeroed part of the range (QSD does).
                    model.discard(offset, length)
                    continue
                sys.exit(f"batch {b}: {kind} {offset}+{length}: {e}")
            if kind == "read":
                wrong = model.check(offset, buf.to_bytearray())
                if wrong:
                    sys.exit(f"batch {b}: read {offset}+{length}: byte {wrong[0]} is "
                             f"{wrong[1]:#04x}, expected {wrong[2]:#04x}")
            elif kind == "write":
                model.set(offset, arg)
            elif kind == "zero":
                model.zero(offset, length)
            elif kind == "trim":
                model.discard(offset, length)
    offset = 0
    while offset < size:
        length = min(size - offset, 1 << 20)
        wrong = model.check(offset, h.pread(length, offset))
        if wrong:
            sys.exit(f"final read: byte {wrong[0]} is {wrong[1]:#04x}, expected {wrong[2]:#04x}")
        offset += length
    h.flush()
    h.shutdown()
    with open(model_out, "wb") as f:
        f.write(model.data)


if __name__ == "__main__":
    main()
