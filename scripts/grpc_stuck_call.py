"""Plain-gRPC reproduction of a grpcio bug: a server-streaming call that has its status
(UNAVAILABLE) while its response iterator never returns; `call.cancel()` cannot free it.

    python scripts/grpc_stuck_call.py [trials] [--no-retries]   # exit 1 if a call got stuck

No augsvc code. One server process runs one gRPC server per trial (a server-streaming
method sending two 16 KiB messages). CLIENTS threads, each on its own channel (own
connection), call it back to back (after a failure: 50-100 ms back-off). Then the server
drains the way a graceful server does: new calls are refused with UNAVAILABLE, it waits
for the running ones to end, calls `stop(0)` (GOAWAY), and its port refuses connections.
A client still inside `next(call)` STUCK_S after its call reported a status is stuck:
the script prints the call's code, details and the operations grpc still has due, calls
`cancel()` (a no-op once a status is there), then `channel.close()`, which frees it.

What happens (GRPC_TRACE=retry): the client whose call ended last starts its next call
at once; the GOAWAY reaches it with stream_network_state=kNotSeenByServer, so the retry
filter (retry_filter_legacy_call_data.cc) schedules a transparent retry; the retry's LB
pick fails (connection refused), the filter commits and delivers recv_trailing_metadata
(the status the Python surface reports), but the attempt's pending RECV_INITIAL_METADATA
and RECV_MESSAGE batches are never completed until the channel is closed, and Python's
iterator waits for RECV_MESSAGE forever. `--no-retries` (grpc.enable_retries=0, no
transparent retry) avoids it. Measured here, grpcio 1.85.3 (2 cores): 19 and 27 stuck
calls in two runs of 300 trials; 0 in 300 with --no-retries.
"""

from __future__ import annotations

import multiprocessing
import random
import sys
import threading
import time
from concurrent import futures
from multiprocessing.connection import Connection

import grpc

METHOD = "/repro.Repro/Stream"
CLIENTS = 2
CALLS_AFTER_STOP = 3  # failed calls after the stop before a client gives up
STUCK_S = 3.0


def _serve(commands: Connection) -> None:
    """One server per trial, in this one process: serve until told to stop, then drain
    like a graceful server does (new calls refused with UNAVAILABLE, wait for the
    running ones to end) and stop(0) (GOAWAY); its port then refuses connections."""
    while commands.recv() == "start":
        cond = threading.Condition()
        state = {"active": 0, "refusing": False}

        def release(state: dict = state, cond: threading.Condition = cond) -> None:
            with cond:
                state["active"] -= 1
                cond.notify_all()

        def stream(request: bytes, context: grpc.ServicerContext,
                   state: dict = state, cond: threading.Condition = cond,
                   release: object = release):
            with cond:
                if state["refusing"]:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
                state["active"] += 1
            context.add_callback(release)
            for _ in range(2):
                yield b"x" * 16384

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=CLIENTS + 4))
        handler = grpc.method_handlers_generic_handler(
            "repro.Repro", {"Stream": grpc.unary_stream_rpc_method_handler(stream)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        commands.send(port)
        commands.recv()  # "stop"
        with cond:
            state["refusing"] = True
            while state["active"]:
                cond.wait()
        server.stop(0).wait()
        commands.send("stopped")


def _client(channel: grpc.Channel, stopped: threading.Event, stuck: list) -> None:
    """Call back to back; after a failure back off 50-100 ms; after the stop, end after
    CALLS_AFTER_STOP failed calls."""
    call_fn = channel.unary_stream(METHOD)
    failures = 0
    while failures < CALLS_AFTER_STOP:
        try:
            call = call_fn(b"", timeout=60)
        except ValueError:  # the watcher closed the channel of a stuck call
            return
        threading.Thread(target=_watch, args=(call, channel, stuck), daemon=True).start()
        try:
            for _ in call:
                pass
            failed = False
        except grpc.RpcError:
            failed = True
        call.finished = True
        if failed:
            failures += stopped.is_set()
            time.sleep(0.05 + 0.05 * random.random())


def _watch(call: grpc.Call, channel: grpc.Channel, stuck: list) -> None:
    """Report the call if it has a status but its iterator has not returned STUCK_S later."""
    while not call.done():
        if getattr(call, "finished", False):
            return
        time.sleep(0.05)
    time.sleep(STUCK_S)
    if getattr(call, "finished", False):
        return
    stuck.append(call)
    due = sorted(op.name for op in call._state.due)  # private, for the report only
    call.cancel()
    time.sleep(0.5)
    after_cancel = "returned" if getattr(call, "finished", False) else "still blocked"
    channel.close()
    time.sleep(0.5)
    after_close = "returned" if getattr(call, "finished", False) else "still blocked"
    print(f"STUCK: status {call.code().name} ({call.details()!r}) {STUCK_S:g} s ago, "
          f"the iterator still blocked; grpc has due {due}; after cancel(): {after_cancel}; "
          f"after channel.close(): {after_close}", flush=True)


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--no-retries"]
    trials = int(args[0]) if args else 300
    options = [("grpc.enable_retries", 0)] if "--no-retries" in sys.argv else []
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(theirs,), daemon=True)
    server.start()
    stuck: list = []
    ids = iter(range(1 << 30))
    for trial in range(trials):
        ours.send("start")
        target = f"127.0.0.1:{ours.recv()}"
        stopped = threading.Event()
        channels = [grpc.insecure_channel(target, options=[*options,
                                                           ("grpc.channel_id", next(ids)),
                                                           ("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(CLIENTS)]
        clients = [threading.Thread(target=_client, args=(ch, stopped, stuck), daemon=True)
                   for ch in channels]
        for c in clients:
            c.start()
        time.sleep(0.1 + 0.1 * random.random())
        ours.send("stop")
        stopped.set()
        ours.recv()
        for c in clients:
            c.join(STUCK_S + 2)
        for channel in channels:
            channel.close()
        if trial % 50 == 49:
            print(f"trial {trial + 1}: {len(stuck)} stuck call(s) so far", flush=True)
    ours.send("exit")
    print(f"grpcio {grpc.__version__}: {len(stuck)} stuck call(s) in {trials} trials")
    return 1 if stuck else 0


if __name__ == "__main__":
    sys.exit(main())
