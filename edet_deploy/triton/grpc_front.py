"""The gRPC front of `serve`: a grpc.aio proxy between clients and tritonserver's gRPC port (on loopback).

It applies the HTTP front's rules (`front.py`) to the KServe gRPC protocol, so that neither port lets a client
reach Triton 2.51's weak spots: an inference request (ModelInfer, and each message of a ModelStreamInfer stream)
is checked by `front.check_inference` before it is forwarded, which refuses (INVALID_ARGUMENT, nothing forwarded)

- shapes that are not positive integers and batches outside the model's bound: a forged `[2^32, S, S, 3]` sent
  to the engine member reaches its Python backend as batch S and fails every good request of that dynamic batch;
- raw contents that disagree with the shapes and datatypes they are declared with;
- the classification extension (Triton dies of SIGFPE on it for the BYTES output `detection_labels`).

Messages over the front's limit (`front.MAX_BODY`, what the preprocess model accepts plus 1 MiB) are refused by
gRPC itself (RESOURCE_EXHAUSTED) before they are buffered whole; Triton's own gRPC takes 2 GiB. Health is answered
from `Upstream` like the HTTP front's (ServerLive, ServerReady, ModelReady), a model being recovered answers
UNAVAILABLE (retryable) instead of Triton's "unknown model" or "stub is not healthy", and a restarting server
UNAVAILABLE. Every other method is forwarded byte for byte with the caller's metadata (so the restricted-API key
reaches Triton, which keeps enforcing it) and deadline. Requests are forwarded as received, not re-encoded."""
from __future__ import annotations

import asyncio
import re
import threading
from typing import AsyncIterator, Dict, Optional, Tuple

from .. import contract
from ..errors import EdetError
from .front import MAX_BODY, RECOVERABLE, RETRY_AFTER_S, Upstream, check_inference

SERVICE = "inference.GRPCInferenceService"
# Metadata the gRPC runtime sets itself: forwarding it would be refused or duplicated.
RESERVED_METADATA = ("grpc-", ":")
RESERVED_KEYS = {"content-type", "te", "user-agent", "host"}
# The loopback channel to tritonserver. gRPC's default reconnect backoff (1 s, x1.6 per failed attempt, up to
# 120 s) would keep the front answering UNAVAILABLE long after a restarted tritonserver is ready again on the
# same port (the HTTP front reconnects per request): retry every 0.1-0.5 s instead.
UPSTREAM_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
                    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 500)]
# What gRPC itself says when tritonserver cannot be reached (Triton's own UNAVAILABLE answers, a restricted API
# among them, are passed on as they are).
# Triton's gRPC answers a restricted API called without its key with UNAVAILABLE, a code clients retry.
RESTRICTED = re.compile(r"This (API|protocol) is restricted")
TRANSPORT_FAILURE = re.compile(r"failed to connect|Connection refused|Socket closed|Connection reset|Broken pipe|"
                               r"GOAWAY|Cancelling all calls|connection attempt", re.IGNORECASE)


def _pb():
    from tritonclient.grpc import service_pb2

    return service_pb2


def _parameter(p) -> object:
    """An InferParameter's value, as the JSON of the HTTP protocol would carry it."""
    return getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None


def check_grpc_inference(request, max_batch_size: Optional[int]) -> Optional[str]:
    """Why a ModelInferRequest is refused, or None: the HTTP front's checks (`check_inference`) on the request as
    the JSON protocol would state it, each raw content standing for its input's binary data."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        return f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
    inputs = []
    for i, t in enumerate(request.inputs):
        item = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if raw:
            item["parameters"] = {contract.BINARY_DATA_SIZE: len(raw[i])}
        inputs.append(item)
    outputs = [{"name": o.name, "parameters": {k: _parameter(v) for k, v in o.parameters.items()}}
               for o in request.outputs]
    return check_inference({"inputs": inputs, "outputs": outputs}, sum(len(r) for r in raw), max_batch_size)


class _Abort(Exception):
    def __init__(self, code, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class GrpcFront:
    """Listen on (address, port) and forward to `upstream.grpc_port` on loopback (see the module docstring). The
    port is bound in the constructor, so a taken port is refused before anything else starts."""

    def __init__(self, upstream: Upstream, address: str, port: int, max_message: int = MAX_BODY):
        import grpc

        self.grpc = grpc
        self.upstream = upstream
        self.max_message = max_message
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.channel = None
        self.channel_port: Optional[int] = None
        self.calls: Dict[str, object] = {}
        self.active = 0  # unary calls and stream messages in flight (an idle open stream does not count)
        self.draining = False
        self.thread: Optional[threading.Thread] = None
        self.loop_ready = threading.Event()
        bound = self.loop.run_until_complete(self._bind(address, port))
        if not bound:
            self.loop.close()
            raise EdetError(f"grpc port {port} on {address} is already in use; choose another (--grpc-port) or stop "
                            f"what listens there")
        self.address, self.port = address, bound

    @property
    def url(self) -> str:
        return f"{self.address}:{self.port}"

    async def _bind(self, address: str, port: int) -> int:
        grpc = self.grpc
        self.server = grpc.aio.server(
            handlers=[_Handler(self)],
            options=[("grpc.max_receive_message_length", self.max_message), ("grpc.max_send_message_length", -1),
                     ("grpc.so_reuseport", 0)])  # without it a second server could bind the same port
        host = f"[{address}]" if ":" in address else address
        try:
            return self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            return 0

    # -- lifecycle (called from other threads) --------------------------------------------------------------
    def start(self) -> "GrpcFront":
        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            self.loop_ready.set()
            self.loop.run_forever()
            self.loop.close()

        self.thread = threading.Thread(target=run, name="edet-grpc-front", daemon=True)
        self.thread.start()
        if not self.loop_ready.wait(30):
            raise EdetError(f"the gRPC front on {self.url} did not start")
        return self

    def drain(self, grace: float) -> int:
        """Refuse new RPCs, let those in flight finish for up to `grace` s; returns how many were still running."""
        if not self.loop_ready.is_set() or self.loop.is_closed():
            return 0
        return asyncio.run_coroutine_threadsafe(self._drain(grace), self.loop).result(grace + 10)

    def close(self) -> None:
        if self.loop_ready.is_set() and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(15)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        elif not self.loop.is_closed():
            self.loop.run_until_complete(self.server.stop(0))
            self.loop.close()

    async def _drain(self, grace: float) -> int:
        """New calls and stream messages are refused (UNAVAILABLE) from now on; once the work in flight is done
        (or `grace` is over), the server stops, ending open streams (a client keeps an idle one open for its
        life: waiting for it would hold every stop for the whole grace period)."""
        self.draining = True
        deadline = self.loop.time() + grace
        while self.active and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = self.active
        await self.server.stop(0)
        return left

    async def _close(self) -> None:
        await self.server.stop(0)
        if self.channel is not None:
            await self.channel.close()

    # -- upstream ---------------------------------------------------------------------------------------------
    def _call(self, path: str, streaming: bool = False):
        """The multicallable for `path` on a channel to tritonserver's gRPC port as it is now (a restart may move
        it); bytes in, bytes out."""
        if self.channel is None or self.channel_port != self.upstream.grpc_port:
            old, self.channel_port = self.channel, self.upstream.grpc_port
            self.channel = self.grpc.aio.insecure_channel(f"127.0.0.1:{self.channel_port}", options=UPSTREAM_OPTIONS)
            self.calls = {}
            if old is not None:
                asyncio.ensure_future(old.close(grace=30))
        call = self.calls.get(path)
        if call is None:
            call = self.calls[path] = (self.channel.stream_stream(path) if streaming
                                       else self.channel.unary_unary(path))
        return call

    async def forward(self, path: str, request: bytes, context, model: Optional[str], metadata) -> bytes:
        """One unary call to tritonserver, its answer or its error passed on (`upstream_error`)."""
        if not self.upstream.up:
            raise self.unavailable(model, "the server is restarting")
        try:
            out = await self._call(path)(request, metadata=metadata, timeout=context.time_remaining())
        except self.grpc.aio.AioRpcError as e:
            raise self.upstream_error(e, model) from None
        if path.endswith("/ModelInfer"):
            self.upstream.succeeded(model)
        return out

    def admit_inference(self, request) -> Optional[_Abort]:
        """Why a parsed ModelInferRequest is refused (the checks, a model being recovered, the in-flight bound), or
        None once it holds an in-flight slot (`Upstream.release` it when answered)."""
        up = self.upstream
        info = up.models.get(request.model_name)
        reason = check_grpc_inference(request, info.max_batch_size if info else None)
        if reason:
            return _Abort(self.grpc.StatusCode.INVALID_ARGUMENT, reason)
        unknown = up.unknown_version(request.model_name, request.model_version)
        if unknown:
            return _Abort(self.grpc.StatusCode.NOT_FOUND, unknown)
        if info and not up.model_ready(request.model_name):
            return self.unavailable(request.model_name, "it is being recovered")
        if not up.admit():
            return _Abort(self.grpc.StatusCode.UNAVAILABLE, up.at_capacity())
        return None

    def unavailable(self, model: Optional[str], why: str) -> _Abort:
        what = f"model {model}" if model else "the server"
        return _Abort(self.grpc.StatusCode.UNAVAILABLE, f"{what} is unavailable ({why}); retry in "
                                                        f"{RETRY_AFTER_S} s")

    def upstream_error(self, error, model: Optional[str]) -> _Abort:
        """Triton's answer, passed on, except: no connection to it (it is restarting), and for a model of the
        repository Triton's "unknown model" or "stub is not healthy" (it is being recovered): UNAVAILABLE."""
        details = error.details() or ""
        code = error.code()
        if code == self.grpc.StatusCode.UNAVAILABLE and RESTRICTED.search(details):
            return _Abort(self.grpc.StatusCode.PERMISSION_DENIED, details)  # not a status to retry on
        if code == self.grpc.StatusCode.UNAVAILABLE and TRANSPORT_FAILURE.search(details):
            return self.unavailable(model, "the server is restarting")
        if model in self.upstream.models and RECOVERABLE.search(details):
            return self.unavailable(model, "it is being recovered")
        return _Abort(code, details)


class _Handler:
    """grpc.GenericRpcHandler for every method of the inference service: bytes in, bytes out."""

    def __init__(self, front: GrpcFront):
        import grpc

        self.front = front
        self.methods: Dict[str, object] = {}
        for m in _pb().DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            path = f"/{SERVICE}/{m.name}"
            if m.client_streaming:
                self.methods[path] = grpc.stream_stream_rpc_method_handler(self._stream(path))
            else:
                self.methods[path] = grpc.unary_unary_rpc_method_handler(self._unary(path, m.name))

    def service(self, handler_call_details):
        return self.methods.get(handler_call_details.method)

    @staticmethod
    def _metadata(context) -> Tuple[Tuple[str, object], ...]:
        return tuple((k, v) for k, v in (context.invocation_metadata() or ())
                     if not k.startswith(RESERVED_METADATA) and k not in RESERVED_KEYS)

    # -- unary methods ------------------------------------------------------------------------------------------
    def _unary(self, path: str, name: str):
        front = self.front
        pb = _pb()

        async def handle(request: bytes, context) -> bytes:
            front.active += 1
            try:
                if front.draining and name not in ("ServerLive", "ServerReady", "ModelReady"):
                    raise front.unavailable(None, "it is shutting down")
                return await answer(request, context)
            except _Abort as a:
                await context.abort(a.code, a.message)
            finally:
                front.active -= 1

        async def answer(request: bytes, context) -> bytes:
            up = front.upstream
            model = None
            if name == "ServerLive":
                return pb.ServerLiveResponse(live=True).SerializeToString()
            if name == "ServerReady":
                return pb.ServerReadyResponse(ready=up.ready()).SerializeToString()
            if name in ("ModelReady", "ModelMetadata", "ModelConfig"):
                parsed = _parse(getattr(pb, f"{name}Request"), request)
                model = parsed.name
                unknown = up.unknown_version(model, parsed.version) if name != "ModelConfig" else None  # restricted
                if unknown:
                    raise _Abort(front.grpc.StatusCode.NOT_FOUND, unknown)
                if name == "ModelReady" and model in up.models:
                    return pb.ModelReadyResponse(ready=up.model_ready(model)).SerializeToString()
            elif name == "ModelInfer":
                parsed = _parse(pb.ModelInferRequest, request)
                model = parsed.model_name
                refused = front.admit_inference(parsed)
                if refused:
                    raise refused
                try:
                    return await front.forward(path, request, context, model, self._metadata(context))
                finally:
                    up.release()
            return await front.forward(path, request, context, model, self._metadata(context))

        return handle

    # -- ModelStreamInfer ---------------------------------------------------------------------------------------
    def _stream(self, path: str):
        front = self.front
        pb = _pb()

        async def handle(requests: AsyncIterator[bytes], context) -> None:
            """Each message is checked and admitted like a ModelInfer; a refused one is answered on the stream
            with an error_message (Triton's way for a request of a stream) and never forwarded. A forwarded
            message holds its in-flight slot (and counts as work in flight for the drain) until a response
            arrives (one each: the models are not decoupled). Written with context.write, not as a generator, so
            that the clean-up runs when the call ends however it ends (grpc.aio cancels this task)."""
            up = front.upstream
            answers: asyncio.Queue = asyncio.Queue()
            forward: asyncio.Queue = asyncio.Queue()
            done = object()
            holding = [0]  # slots this stream holds = its messages in flight

            def take() -> None:
                holding[0] += 1
                front.active += 1

            def give_back(n: int = 1) -> None:
                n = min(n, holding[0])
                holding[0] -= n
                front.active -= n
                for _ in range(n):
                    up.release()

            async def accepted() -> AsyncIterator[bytes]:
                while (item := await forward.get()) is not done:
                    yield item

            def refusal(parsed, reason: str) -> bytes:
                return pb.ModelStreamInferResponse(
                    error_message=reason,
                    infer_response=pb.ModelInferResponse(model_name=parsed.model_name, id=parsed.id)
                ).SerializeToString()

            async def read_client() -> None:
                try:
                    async for message in requests:
                        try:
                            parsed = _parse(pb.ModelInferRequest, message)
                        except _Abort as a:
                            await answers.put(pb.ModelStreamInferResponse(error_message=a.message).SerializeToString())
                            continue
                        refused = (front.unavailable(None, "it is shutting down") if front.draining
                                   else front.admit_inference(parsed))
                        if refused:
                            await answers.put(refusal(parsed, refused.message))
                        else:
                            take()
                            await forward.put(message)
                except front.grpc.aio.AioRpcError:
                    pass  # the client went away: the call ends
                except Exception as e:  # noqa: BLE001 - a bug of ours ends this stream, not the front
                    await answers.put(_Abort(front.grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
                finally:
                    await forward.put(done)

            async def read_upstream() -> None:
                try:
                    call = front._call(path, streaming=True)(accepted(), metadata=self._metadata(context),
                                                             timeout=context.time_remaining())
                    async for message in call:
                        give_back()
                        answered = pb.ModelStreamInferResponse.FromString(message)
                        if not answered.error_message:  # an error answered on the stream proves no stub alive
                            up.succeeded(answered.infer_response.model_name)
                        await answers.put(message)
                except front.grpc.aio.AioRpcError as e:
                    await answers.put(front.upstream_error(e, None))
                except Exception as e:  # noqa: BLE001 - as above: surfaced, never an OK end that lost answers
                    await answers.put(front.unavailable(None, f"{type(e).__name__}: {e}"))
                finally:
                    await answers.put(done)

            client_task = asyncio.ensure_future(read_client())
            upstream_task = asyncio.ensure_future(read_upstream())
            try:
                while (item := await answers.get()) is not done:
                    if isinstance(item, _Abort):
                        await context.abort(item.code, item.message)
                    await context.write(item)
                while not answers.empty():  # refusals queued after the upstream stream ended
                    item = answers.get_nowait()
                    if isinstance(item, bytes):
                        await context.write(item)
            finally:
                for task in (client_task, upstream_task):
                    task.cancel()
                give_back(holding[0])

        return handle


def _parse(message_type, data: bytes):
    import google.protobuf.message

    try:
        return message_type.FromString(data)
    except google.protobuf.message.DecodeError:
        import grpc

        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {message_type.__name__}") from None

