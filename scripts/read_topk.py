"""Reads Distillery's compact top-K sidecar (`kd-generate --store-logits K --logits-format
compact` writes `<out>.logits.topk`; the layout is in docs/FORMATS.md), with the standard
library only, so that other tools can use the files.

    python scripts/read_topk.py FILE                       # header, blocks, rows, bytes per row
    python scripts/read_topk.py FILE --row R --rows N      # one record's rows as JSON

As a module: `TopKFile(path).rows(row, n)` (a record's rows, by its `teacher_logits`
pointer) or `for first_row, rows in TopKFile(path)` (every record, streamed in order); each
row is `(ids, logprobs, tail_logmass)`, ids most likely first. A corrupt or cut-off block
raises ValueError naming the block and its rows.
"""
import argparse
import bisect
import json
import os
import struct

MAGIC, END = b"DSTLTOPK", b"DSTLEND1"
ESCAPE = 32


def fnv64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def f16_value(h):
    return struct.unpack("<e", struct.pack("<H", h))[0]


class _Bits:
    """Least-significant-bit-first reader over one payload."""

    def __init__(self, payload):
        self.v, self.pos, self.n = int.from_bytes(payload, "little"), 0, 8 * len(payload)

    def get(self, bits):
        if self.pos + bits > self.n:
            raise ValueError("the payload ends inside a row")
        x = (self.v >> self.pos) & ((1 << bits) - 1)
        self.pos += bits
        return x

    def rice(self, r):
        q = 0
        while q < ESCAPE and self.get(1) == 1:
            q += 1
        if q == ESCAPE:
            return self.get(32)
        return (q << r) | self.get(r)


NEW_COUNT_RICE = 3


def _rice_run(bits, n):
    if n == 0:
        return []
    r = bits.get(5)
    return [bits.rice(r) for _ in range(n)]


def _ascending(gaps, start=-1):
    out, x = [], start
    for g in gaps:
        x += g + 1
        out.append(x)
    return out


def decode_rows(payload, n, k, step, version=2, recent_cap=0):
    """The rows of one block's payload: a list of (ids, logprobs, tail_logmass)."""
    bits, rows, recent = _Bits(payload), [], []
    for _ in range(n):
        tail = f16_value(bits.get(16))
        if version == 1:
            ids = _ascending(_rice_run(bits, k))
            qmax = bits.get(16)
            ws = _rice_run(bits, k)
        else:
            # Ids: positions in the record's list of recent ids, then new ids (docs/FORMATS.md).
            n_new = bits.rice(NEW_COUNT_RICE)
            if n_new > k:
                raise ValueError("a row has more new ids than k")
            hits = _ascending(_rice_run(bits, k - n_new))
            if hits and hits[-1] >= len(recent):
                raise ValueError("a list position is out of range")
            new = _ascending(_rice_run(bits, n_new))
            ids = [recent[p] for p in hits] + new
            hit = set(hits)
            recent = (ids + [t for p, t in enumerate(recent) if p not in hit])[:recent_cap]
            qmax = bits.get(16)
            ws = _rice_run(bits, k)
        if any(x > qmax for x in ws):
            raise ValueError("a log-probability is out of range")
        entries = sorted((qmax - x, i) for i, x in zip(ids, ws))
        rows.append(([i for _, i in entries], [-q * step for q, _ in entries], tail))
    if (bits.pos + 7) // 8 != len(payload):
        raise ValueError("bytes left after the last row")
    return rows


class TopKFile:
    def __init__(self, path):
        self.path = path
        self.f = open(path, "rb")
        size = os.fstat(self.f.fileno()).st_size
        head = self.f.read(12)
        if len(head) < 12 or head[:8] != MAGIC:
            raise ValueError(f"{path}: not a compact top-K file")
        (n,) = struct.unpack("<I", head[8:])
        self.header = json.loads(self.f.read(n))
        self.version = self.header.get("version")
        if self.version not in (1, 2):
            raise ValueError(f"{path}: version {self.version} is not supported (this reader reads 1 and 2)")
        self.k, self.step, self.first_block = self.header["k"], self.header["step"], 12 + n
        self.recent_cap = self.header.get("recent_ids", 0)
        self.f.seek(size - 24)
        foot = self.f.read(24)
        if len(foot) < 24 or foot[16:] != END:
            raise ValueError(f"{path}: truncated (no footer); stream it with blocks() to find the last whole block")
        at, count = struct.unpack("<QQ", foot[:16])
        self.f.seek(at)
        index = self.f.read(1 + 20 * count)
        if index[:1] != b"I" or len(index) != 1 + 20 * count:
            raise ValueError(f"{path}: corrupt index")
        self.blocks = [struct.unpack("<QQI", index[1 + 20 * i:21 + 20 * i]) for i in range(count)]
        self.starts = [first for _, first, _ in self.blocks]

    def _block(self, offset, label):
        self.f.seek(offset)
        head = self.f.read(17)
        if len(head) < 17 or head[:1] != b"B":
            raise ValueError(f"{self.path}: {label} is cut off or corrupt")
        rows, size, check = struct.unpack("<IIQ", head[1:])
        payload = self.f.read(size)
        if len(payload) < size or fnv64(payload) != check:
            raise ValueError(f"{self.path}: {label} is cut off or corrupt (checksum)")
        return rows, payload

    def rows(self, row, n):
        """A record's rows by its pointer (`row`, `rows`): random access through the index."""
        if n == 0:
            return []
        b = bisect.bisect_left(self.starts, row)
        # Blocks of zero rows share their start with the next one: take the one that fits.
        for b in range(b, len(self.blocks)):
            offset, first, count = self.blocks[b]
            if first != row:
                break
            if count == n:
                label = f"record block {b} (rows {row}..{row + n})"
                got, payload = self._block(offset, label)
                try:
                    return decode_rows(payload, got, self.k, self.step, self.version, self.recent_cap)
                except ValueError as e:
                    raise ValueError(f"{self.path}: {label} is corrupt: {e}") from None
        raise ValueError(f"{self.path}: rows {row}..{row + n} are not a record block")

    def __iter__(self):
        """Every block in file order as (first_row, rows): a streaming read, no index needed."""
        offset, first, b = self.first_block, 0, 0
        while True:
            self.f.seek(offset)
            if self.f.read(1) != b"B":
                return
            label = f"record block {b} (from row {first})"
            n, payload = self._block(offset, label)
            yield first, decode_rows(payload, n, self.k, self.step, self.version, self.recent_cap)
            offset, first, b = offset + 17 + len(payload), first + n, b + 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--row", type=int)
    ap.add_argument("--rows", type=int)
    a = ap.parse_args()
    t = TopKFile(a.file)
    if a.row is not None:
        print(json.dumps([{"ids": i, "logprobs": lp, "tail_logmass": tl} for i, lp, tl in t.rows(a.row, a.rows)]))
        return
    total = sum(c for _, _, c in t.blocks)
    size = os.path.getsize(a.file)
    print(json.dumps({"header": t.header, "blocks": len(t.blocks), "rows": total,
                      "bytes": size, "bytes_per_row": size / total if total else None}))


if __name__ == "__main__":
    main()
