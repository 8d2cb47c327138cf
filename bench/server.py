"""Remote get/put throughput of a real `kvfuse serve` over HTTP and over lm://, beside an in-process copy.

    .venv/bin/python bench/server.py --quick     # 8 chunks, 100 lookups
    .venv/bin/python bench/server.py             # 32 chunks, 500 lookups

Chunks are 5.6 MiB fp16 ([30 layers, 2, 256 tokens, 3 KV heads, 64 dims], SmolLM2-135M), held in the host
tier (prefaulted, disk off: the wire is measured, not first-touch page faults or the disk). HTTP:
KVClient entries (checksummed both ways); `http_get` receives each into one reused buffer
(`get(key, out=...)`) as the lm:// client does, `http_get_new` each into new memory (a caller keeping
every entry). lm://: a blocking client of the spec's protocol, as LMCache's connector does it
(recv_into a buffer); a PUT has no reply, so the put time ends with a HEALTH round trip after the last
one. Each rate is the best of 3 rounds (the machine is shared). Lookup: RemoteConnector.lookup of a
2048-token prompt (8 chunk keys) over HTTP; EXIST over lm://. Prints one JSON line and saves
bench/out/server.png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvstore import Entry, KVLayout, Namespace  # noqa: E402
from kvstore.http_client import KVClient  # noqa: E402
from kvstore.remote import RemoteConnector  # noqa: E402
from kvstore.service.launch import ServerProcess, launch  # noqa: E402

LAYOUT = KVLayout(30, 3, 64, torch.float16, 256)
LM_SHAPE = (2, 30, 256, 192)  # the same bytes as LMCache's KV_2LTD chunk
GIB = 2**30
CLIENT, REPLY = struct.Struct("iiiiiiiii150s"), struct.Struct("iiiiiiiii")


class LmClient:
    """The spec's lm:// client, blocking, receiving straight into a preallocated buffer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, command: int, key: str, length: int = 0, shape=(0, 0, 0, 0)) -> None:
        self.sock.sendall(CLIENT.pack(command, length, 1, 2, 0, *shape, key.encode().ljust(150)))

    def _reply(self) -> tuple[int, ...]:
        buf = bytearray(REPLY.size)
        view, got = memoryview(buf), 0
        while got < len(buf):
            got += self.sock.recv_into(view[got:])
        return REPLY.unpack(buf)

    def put(self, key: str, payload: memoryview) -> None:
        self._send(1, key, len(payload), LM_SHAPE)
        self.sock.sendall(payload)

    def get_into(self, key: str, out: memoryview) -> int:
        self._send(2, key)
        header = self._reply()
        got = 0
        while got < header[1]:
            got += self.sock.recv_into(out[got : header[1]])
        return header[0]

    def exists(self, key: str) -> bool:
        self._send(3, key)
        return self._reply()[0] == 200

    def health(self) -> bool:
        self._send(5, "")
        return self._reply()[0] == 200


def _best(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": s[len(s) // 2] * 1e3, "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3}


def bench_transfers(
    client: KVClient, port: int, data: list[torch.Tensor], rounds: int = 3
) -> dict[str, float]:
    """HTTP and lm:// put/get, round by round side by side (so both see the same load on the shared cores)."""
    nbytes = sum(t.numel() * 2 for t in data)
    raws = [memoryview(t.view(torch.uint8).numpy()).cast("B") for t in data]
    lm, out = LmClient(port), memoryview(bytearray(raws[0].nbytes))
    http_out = memoryview(bytearray(raws[0].nbytes + (64 << 10)))  # an entry: the tensor + its header
    names = ("http_put", "lm_put", "http_get", "lm_get", "http_get_new")
    times: dict[str, list[float]] = {k: [] for k in names}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)

    for r in range(rounds):
        entries = [Entry.plain(f"http-{r}-{i}", LAYOUT, t) for i, t in enumerate(data)]
        timed("http_put", lambda entries=entries: [client.put(e) for e in entries])
        timed(
            "lm_put",
            lambda r=r: (
                [lm.put(f"bench@1@0@{r}-{i}@half", raw) for i, raw in enumerate(raws)] and lm.health()
            ),
        )  # a PUT has no reply: HEALTH answers once every PUT before it is stored
        got = []  # into one reused buffer, as the lm:// client does (each get checksum-verified)
        timed(
            "http_get",
            lambda entries=entries, got=got: got.extend(client.get(e.key, out=http_out) for e in entries),
        )
        assert torch.equal(got[-1].kv, entries[-1].kv) and _inside(got[-1].kv, http_out)
        got = []  # each into new memory (what a caller that keeps every entry gets)
        timed("http_get_new", lambda entries=entries, got=got: got.extend(client.get(e.key) for e in entries))
        assert all(torch.equal(g.kv, e.kv) for g, e in zip(got, entries, strict=True))
        codes = []
        timed(
            "lm_get",
            lambda r=r, codes=codes: codes.extend(
                lm.get_into(f"bench@1@0@{r}-{i}@half", out) for i in range(len(raws))
            ),
        )
        assert codes == [200] * len(raws) and bytes(out) == bytes(raws[-1])
    return {f"{name}_gibs": nbytes / min(ts) / GIB for name, ts in times.items()}


def _inside(t: torch.Tensor, view: memoryview) -> bool:
    """Whether `t` views the bytes of `view` (it was received into it)."""
    start = torch.frombuffer(view, dtype=torch.uint8).data_ptr()
    return start <= t.data_ptr() < start + view.nbytes


def bench_latency(server: ServerProcess, lookups: int) -> dict[str, float]:
    remote = RemoteConnector(server.url, Namespace("bench", LAYOUT))
    tokens = list(range(2048))
    remote.store(tokens[:1024], torch.zeros(LAYOUT.chunk_shape(1024), dtype=torch.float16))
    lm = LmClient(server.lm_port)
    lookup, exist = [], []
    for _ in range(lookups):
        t0 = time.perf_counter()
        assert remote.lookup(tokens) == 1024
        lookup.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lm.exists("bench@1@0@0-0@half")
        exist.append(time.perf_counter() - t0)
    out = {f"lookup_{k}": v for k, v in _percentiles(lookup).items()}
    out.update({f"lm_exist_{k}": v for k, v in _percentiles(exist).items()})
    return out


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["copy_gibs", "http_put_gibs", "http_get_gibs", "http_get_new_gibs", "lm_put_gibs", "lm_get_gibs"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([n.replace("_gibs", "") for n in names], [result[n] for n in names], color="#4a7ab0")
    ax.axhline(2.5, color="#c44", ls="--", lw=1, label="lm:// get target 2.5")
    ax.axhline(1.2, color="#e90", ls="--", lw=1, label="lm:// put target 1.2")
    ax.set_ylabel("GiB/s (5.6 MiB chunks, loopback)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 chunks, 100 lookups")
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument(
        "--plain-bodies", action="store_true", help="KVFUSE_BULK_BODIES=false: uvicorn's own body path"
    )
    args = parser.parse_args()
    chunks = args.chunks or (8 if args.quick else 32)
    lookups = 100 if args.quick else 500
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(LAYOUT.chunk_shape(256), generator=g).half() for _ in range(chunks)]
    nbytes = sum(t.numel() * 2 for t in data)
    result = {"bench": "server", "chunks": chunks, "chunk_mib": round(data[0].numel() * 2 / 2**20, 3)}
    result["bulk_bodies"] = not args.plain_bodies
    result["copy_gibs"] = nbytes / _best(lambda: [t.clone() for t in data]) / GIB
    host = f"{(2 * 3 * nbytes + (256 << 20)) >> 20}MiB"  # every round of both protocols stays in RAM
    with tempfile.TemporaryDirectory() as home:
        env = {"KVFUSE_HOST_BYTES": host, "KVFUSE_DISK_BYTES": "0", "KVFUSE_HOST_PREFAULT": "1"}
        env["KVFUSE_BULK_BODIES"] = "false" if args.plain_bodies else "true"
        server = launch(Path(home), env)
        try:
            result.update(bench_transfers(KVClient(server.url), server.lm_port, data))
            result.update(bench_latency(server, lookups))
            result["server_rss_mib"] = round(server.rss_bytes() / 2**20, 1)
        finally:
            server.stop()
    result["http_vs_lm_get"] = result["http_get_gibs"] / result["lm_get_gibs"]
    result["http_vs_lm_put"] = result["http_put_gibs"] / result["lm_put_gibs"]
    result["http_new_vs_lm_get"] = result["http_get_new_gibs"] / result["lm_get_gibs"]
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps(result), flush=True)
    try:
        _plot(result, REPO / "bench" / "out" / "server.png")
    except ImportError:  # matplotlib is the optional `bench` extra
        print("matplotlib not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
