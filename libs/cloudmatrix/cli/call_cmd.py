"""`cmx call TARGET METHOD --json '{...}'`: call any RPC of a running server through gRPC reflection.

Works from the server's reflection service alone (no generated stubs), so it reaches every service
of the suite and any other server that enables reflection. TARGET is host:port, a process name of
a `cmx up` run (``gateway-0``) or a service/entry name (``kvcache``: its first process).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cloudmatrix.launcher.processes import load_state, run_tls
from cloudmatrix.rpc.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options, make_sync_channel
from cloudmatrix.rpc.tls import use_process_tls

DEFAULT_RUN_DIR = "runs/local"
_UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Unreachable(Exception):
    """The target did not answer the first reflection request (exit 1)."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("call", help="call any RPC of a running server through gRPC server reflection")
    parser.add_argument("target", help="host:port, a process name of the run (gateway-0, kvcache-1), or a "
                                       "service or entry name (kvcache, ub_fabric, fabric) meaning its first process")
    parser.add_argument("method", nargs="?", help="Service/Method (cmx.gateway.v1.Gateway/ListModels), "
                                                  "Gateway/ListModels, or Method alone when one service has it")
    parser.add_argument("--json", default="{}", help="the request as JSON; @FILE reads it from a file, - from "
                                                     "stdin; a JSON list of messages for client-streaming methods")
    parser.add_argument("--list", action="store_true", help="list the server's services and methods")
    parser.add_argument("--describe", action="store_true", help="print the fields of METHOD's request message")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds for connecting and the call")
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="request metadata; repeat for several entries")
    parser.add_argument("--emit-defaults", action="store_true",
                        help="print fields that hold their default value (0, empty) too")
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="the `cmx up` run whose state resolves names")
    parser.set_defaults(handler=_call)


def _call(args: argparse.Namespace) -> int:
    if args.list == bool(args.method):
        raise ValueError("name a METHOD to call, or pass --list (not both)")
    address, label = resolve_target(args.target, Path(args.run_dir))
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    use_process_tls(run_tls(Path(args.run_dir)) if args.run_dir else None)
    with make_sync_channel(address, options) as channel:
        try:
            return _run(args, channel, address)
        except Unreachable as err:
            print(f"cmx call: cannot reach {label}: {err}", file=sys.stderr)
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace, channel: grpc.Channel, address: str) -> int:
    services = load_services(channel, args.timeout)
    if args.list:
        print(render_services(services))
        return 0
    method = find_method(services, args.method, address)
    if args.describe:
        print(render_message(method.input_type))
        return 0
    requests = parse_requests(method, _read_text(args.json))
    metadata = parse_metadata(args.metadata)
    for reply in invoke(channel, method, requests, args.timeout, metadata):
        print(_to_json(reply, args.emit_defaults, indent=None if method.server_streaming else 2), flush=True)
    return 0


# --- target -------------------------------------------------------------------------------------

def resolve_target(target: str, run_dir: Path) -> tuple[str, str]:
    """(address, label) for host:port, a process name of the run, or a service/entry name."""
    if ":" in target:
        return target, target
    records = load_state(run_dir)
    named = [r for r in records if r.name == target]
    typed = [r for r in records if r.service == target or re.fullmatch(rf"{re.escape(target)}-\d+", r.name)]
    if not (named or typed):
        names = ", ".join(r.name for r in records)
        raise ValueError(f"no process or service {target!r} in {run_dir} (processes: {names})")
    record = (named or typed)[0]
    if not record.port:
        raise ValueError(f"{record.name} has no port in {run_dir} (it never became ready)")
    host = "127.0.0.1" if record.host in ("", "0.0.0.0", "::") else record.host
    address = f"[{host}]:{record.port}" if ":" in host else f"{host}:{record.port}"
    return address, f"{record.name} at {address}"


# --- reflection ---------------------------------------------------------------------------------

def load_services(channel: grpc.Channel, timeout: float) -> list[ServiceDescriptor]:
    """The server's services, resolved into a descriptor pool fed by its reflection service."""
    names = _list_service_names(channel, timeout)
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    return [pool.FindServiceByName(name) for name in sorted(names)]


def _list_service_names(channel: grpc.Channel, timeout: float) -> list[str]:
    """The first reflection request, under a deadline, so that an unreachable target fails fast."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = stub.ServerReflectionInfo(iter([request]), timeout=timeout)
    try:
        reply = next(replies)
    except grpc.RpcError as err:
        if err.code() in _UNREACHABLE_CODES:
            raise Unreachable(f"{err.code().name}: {err.details()}") from err
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise Unreachable("the server does not offer gRPC reflection") from err
        raise
    finally:
        replies.cancel()
    return [s.name for s in reply.list_services_response.service]


def is_standard(service: ServiceDescriptor) -> bool:
    """gRPC's own services (health, reflection), hidden from the short `Method` form."""
    return service.full_name.startswith("grpc.")


def find_method(services: list[ServiceDescriptor], spec: str, address: str) -> MethodDescriptor:
    """`pkg.Service/Method`, `Service/Method`, or `Method` when exactly one service has it."""
    service_name, _, method_name = spec.rpartition("/")
    if service_name:
        candidates = [s for s in services if service_name in (s.full_name, s.name)]
    else:
        candidates = [s for s in services if not is_standard(s)]
        if not any(method_name in s.methods_by_name for s in candidates):
            candidates = [s for s in services if is_standard(s)]
    matches = [s.methods_by_name[method_name] for s in candidates if method_name in s.methods_by_name]
    if len(matches) > 1:
        raise ValueError(f"method {spec!r} is ambiguous on {address}: "
                         f"{', '.join(_path(m) for m in matches)}; name the service")
    if not matches:
        known = ", ".join(_path(m) for s in services for m in s.methods)
        raise ValueError(f"no method {spec!r} on {address}; it has: {known}")
    return matches[0]


def _path(method: MethodDescriptor) -> str:
    return f"{method.containing_service.full_name}/{method.name}"


# --- rendering ----------------------------------------------------------------------------------

def render_services(services: list[ServiceDescriptor]) -> str:
    """Each service and its methods, in proto syntax (stream marks a streaming side)."""
    lines = []
    for service in services:
        lines.append(service.full_name)
        for m in service.methods:
            request = ("stream " if m.client_streaming else "") + m.input_type.full_name
            reply = ("stream " if m.server_streaming else "") + m.output_type.full_name
            lines.append(f"  rpc {m.name}({request}) returns ({reply})")
    return "\n".join(lines)


def render_message(message: Descriptor) -> str:
    """The message's fields in proto syntax, then every message it uses, each once."""
    blocks, seen, todo = [], set(), [message]
    while todo:
        current = todo.pop(0)
        if current.full_name in seen:
            continue
        seen.add(current.full_name)
        lines = [f"message {current.full_name} {{"]
        for field in current.fields:
            lines.append(f"  {_field_line(field)}")
            todo += [t for t in _message_types(field) if t.full_name not in seen]
        blocks.append("\n".join([*lines, "}"]))
    return "\n".join(blocks)


def _field_line(field: FieldDescriptor) -> str:
    if _is_map(field):
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        kind = f"map<{_type_name(key)}, {_type_name(value)}>"
    else:
        kind = ("repeated " if field.is_repeated else "") + _type_name(field)
    line = f"{kind} {field.name} = {field.number};"
    if field.enum_type is not None:
        line += f"  // {', '.join(v.name for v in field.enum_type.values)}"
    return line


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return descriptor_pb2.FieldDescriptorProto.Type.Name(field.type).removeprefix("TYPE_").lower()


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _message_types(field: FieldDescriptor) -> list[Descriptor]:
    if _is_map(field):
        value = field.message_type.fields_by_name["value"].message_type
        return [value] if value is not None else []
    return [field.message_type] if field.message_type is not None else []


def _to_json(message, emit_defaults: bool, indent: int | None) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=indent,
                                     always_print_fields_with_no_presence=emit_defaults)


# --- request and call ---------------------------------------------------------------------------

def _read_text(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    if source.startswith("@"):
        return Path(source[1:]).read_text()
    return source


def parse_requests(method: MethodDescriptor, text: str) -> list:
    """The request message(s): one JSON object, or a JSON list for a client-streaming method."""
    request_class = message_factory.GetMessageClass(method.input_type)
    if not method.client_streaming:
        return [_parse(text, request_class, "--json")]
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--json: not valid JSON: {err}") from err
    if not isinstance(items, list):  # a usage error (exit 2), not a programming one
        raise ValueError(  # noqa: TRY004
            f"--json: {method.name} is client-streaming; give a JSON list of {method.input_type.full_name} messages")
    return [_parse(json.dumps(item), request_class, f"--json[{i}]") for i, item in enumerate(items)]


def _parse(text: str, request_class: type, where: str):
    try:
        return json_format.Parse(text, request_class())
    except json_format.ParseError as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from err


def parse_metadata(items: list[str]) -> list[tuple[str, str | bytes]]:
    """KEY=VALUE pairs; keys are lower-cased (gRPC metadata keys are), -bin values sent as bytes."""
    metadata = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata {item!r}: expected KEY=VALUE")
        key = key.strip().lower()
        metadata.append((key, value.encode() if key.endswith("-bin") else value))
    return metadata


def invoke(channel: grpc.Channel, method: MethodDescriptor, requests: list, timeout: float,
           metadata: list[tuple[str, str | bytes]]) -> Iterator:
    """Call the method generically; yield its reply (unary) or replies (server-streaming)."""
    kind = ("stream" if method.client_streaming else "unary") + "_" + (
        "stream" if method.server_streaming else "unary")
    callable_ = getattr(channel, kind)(
        f"/{_path(method)}", request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(method.output_type).FromString)
    argument = iter(requests) if method.client_streaming else requests[0]
    result = callable_(argument, timeout=timeout, metadata=metadata or None)
    if method.server_streaming:
        yield from result
    else:
        yield result
