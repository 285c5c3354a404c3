"""The kubelet PodResources API (v1): which pod and container holds which device, as dcgm-exporter reads it.

The kubelet serves `v1.PodResourcesLister/List` over gRPC on a Unix socket
(/var/lib/kubelet/pod-resources/kubelet.sock). We need four small messages from its
api.proto, so they are declared here as a descriptor (field numbers as upstream:
k8s.io/kubelet/pkg/apis/podresources/v1/api.proto) and their classes built by protobuf at import:
no generated code to keep in step and no build step.

`list_devices` returns one `DeviceOwner` per device id of `nvidia.com/gpu` (or any resource given).
The NVIDIA device plugin names devices by GPU or MIG UUID; GKE's plugin names them `nvidia0`,
`nvidia1`, ...; `owners.resolve_device` accepts both.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "v1.PodResourcesLister"
LIST_METHOD = f"/{SERVICE}/List"
GPU_RESOURCES = ("nvidia.com/gpu",)


def _build() -> tuple[type, type]:
    f = descriptor_pb2.FileDescriptorProto(
        name="kvpilot/podresources/v1/api.proto", package="v1", syntax="proto3"
    )
    F = descriptor_pb2.FieldDescriptorProto
    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = f.message_type.add(name=name)
        for fname, number, label, ftype, type_name in fields:
            fd = m.field.add(name=fname, number=number, label=label, type=ftype)
            if type_name:
                fd.type_name = type_name

    message("ListPodResourcesRequest")
    message(
        "ListPodResourcesResponse", ("pod_resources", 1, rep, F.TYPE_MESSAGE, ".v1.PodResources")
    )
    message(
        "PodResources",
        ("name", 1, opt, F.TYPE_STRING, ""),
        ("namespace", 2, opt, F.TYPE_STRING, ""),
        ("containers", 3, rep, F.TYPE_MESSAGE, ".v1.ContainerResources"),
    )
    message(
        "ContainerResources",
        ("name", 1, opt, F.TYPE_STRING, ""),
        ("devices", 2, rep, F.TYPE_MESSAGE, ".v1.ContainerDevices"),
        ("cpu_ids", 3, rep, F.TYPE_INT64, ""),
    )
    message(
        "ContainerDevices",
        ("resource_name", 1, opt, F.TYPE_STRING, ""),
        ("device_ids", 2, rep, F.TYPE_STRING, ""),
    )
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(f)
    classes = {
        name: message_factory.GetMessageClass(fd.message_types_by_name[name])
        for name in fd.message_types_by_name
    }
    return classes["ListPodResourcesRequest"], classes["ListPodResourcesResponse"]


ListPodResourcesRequest, ListPodResourcesResponse = _build()


@dataclass(frozen=True)
class DeviceOwner:
    device_id: str
    resource: str
    namespace: str
    pod: str
    container: str


def parse_list_response(
    resp: object, resources: tuple[str, ...] = GPU_RESOURCES
) -> list[DeviceOwner]:
    out = []
    for pod in resp.pod_resources:  # type: ignore[attr-defined]
        for c in pod.containers:
            for dev in c.devices:
                if dev.resource_name not in resources:
                    continue
                out.extend(
                    DeviceOwner(d, dev.resource_name, pod.namespace, pod.name, c.name)
                    for d in dev.device_ids
                )
    return out


async def list_devices(
    socket_path: str, timeout_s: float = 2.0, resources: tuple[str, ...] = GPU_RESOURCES
) -> list[DeviceOwner]:
    """One `List` call over the kubelet socket. Raises grpc.aio.AioRpcError / OSError on failure."""
    async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
        call = channel.unary_unary(
            LIST_METHOD,
            request_serializer=ListPodResourcesRequest.SerializeToString,
            response_deserializer=ListPodResourcesResponse.FromString,
        )
        resp = await call(ListPodResourcesRequest(), timeout=timeout_s)
    return parse_list_response(resp, resources)


def list_handler(respond: object) -> grpc.GenericRpcHandler:
    """A server-side handler for `List` (tests, and a fake kubelet for local runs).

    `respond` is a callable returning a ListPodResourcesResponse.
    """

    async def _list(request: object, context: object) -> object:
        return respond()  # type: ignore[operator]

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "List": grpc.unary_unary_rpc_method_handler(
                _list,
                request_deserializer=ListPodResourcesRequest.FromString,
                response_serializer=ListPodResourcesResponse.SerializeToString,
            )
        },
    )
