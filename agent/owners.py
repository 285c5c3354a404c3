"""GPU -> replica: which pod (and container) holds each GPU on the node.

Tried in order, first answer wins per GPU:
1. what the GPU source itself knows (the emulated source: the modelserver that reported the GPU);
2. the kubelet PodResources API, as dcgm-exporter does (device id = GPU/MIG UUID, or GKE's
   `nvidiaN`);
3. NVML compute processes -> /proc/PID/cgroup -> pod UID -> the replica with that UID;
4. `agent.gpu_map` from the config (endpoint -> GPU indices), for nodes outside Kubernetes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.discovery import Target
from agent.errors import ErrorLog
from agent.gpus import GpuReading
from agent.podresources import DeviceOwner, list_devices
from kvpilot.signals import GpuStats

_GKE_DEVICE = re.compile(r"nvidia(\d+)(?:/gi(\d+))?")
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)


@dataclass(frozen=True)
class Owner:
    replica_id: str
    namespace: str = ""
    pod: str = ""
    container: str = ""


def resolve_device(device_id: str, gpus: Sequence[GpuStats]) -> list[GpuStats]:
    """The GPUs (or MIG slices) a kubelet device id names."""
    by_uuid = [g for g in gpus if g.uuid == device_id]
    if by_uuid:
        return by_uuid
    m = _GKE_DEVICE.fullmatch(device_id) or re.fullmatch(r"(\d+)()", device_id)
    if not m:
        return []
    index, gi = int(m.group(1)), m.group(2)
    return [g for g in gpus if g.index == index and (not gi or g.mig_instance == gi)]


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in a /proc/PID/cgroup file (cgroup v1 paths and v2 systemd slices alike)."""
    m = _POD_UID.search(text)
    return m.group(1).replace("_", "-") if m else None


class OwnerResolver:
    def __init__(
        self,
        errors: ErrorLog,
        *,
        pod_resources_socket: str = "",
        use_pod_resources: bool = False,
        refresh_s: float = 5.0,
        gpu_map: Mapping[str, Sequence[int]] | None = None,
        proc_root: str = "/proc",
    ) -> None:
        self.errors = errors
        self.socket = pod_resources_socket
        self.use_pod_resources = use_pod_resources
        self.refresh_s = refresh_s
        self.gpu_map = {k.rstrip("/"): tuple(v) for k, v in (gpu_map or {}).items()}
        self.proc_root = proc_root
        self._devices: list[DeviceOwner] = []
        self._devices_at = float("-inf")

    def _socket_wanted(self) -> bool:
        """In Kubernetes always (a missing socket is an error); elsewhere only if one is there."""
        return bool(self.socket) and (self.use_pod_resources or os.path.exists(self.socket))

    async def _pod_devices(self) -> list[DeviceOwner]:
        """The kubelet's device assignments, refreshed every refresh_s (they change rarely)."""
        now = time.monotonic()
        if now - self._devices_at < self.refresh_s:
            return self._devices
        self._devices_at = now
        if not self._socket_wanted():
            return []
        try:
            self._devices = await list_devices(self.socket)
            self.errors.clear("pod-resources")
        except Exception as e:  # missing socket, kubelet down, permission denied
            self.errors.report(
                "pod_resources", "pod-resources", f"{self.socket}: {type(e).__name__}: {e}"
            )
            self._devices = []
        return self._devices

    async def resolve(self, reading: GpuReading, targets: Sequence[Target]) -> dict[str, Owner]:
        owners: dict[str, Owner] = {}
        by_address = {t.address: t for t in targets}
        by_id = {t.replica_id: t for t in targets}
        for uuid, address in reading.owners.items():
            t = by_address.get(address.rstrip("/"))
            if t is not None:
                owners[uuid] = Owner(t.replica_id, t.namespace, t.pod)
        if self._socket_wanted():
            for dev in await self._pod_devices():
                t = by_id.get(f"{dev.namespace}/{dev.pod}")
                if t is None:
                    continue
                for g in resolve_device(dev.device_id, reading.gpus):
                    owners.setdefault(
                        g.uuid, Owner(t.replica_id, dev.namespace, dev.pod, dev.container)
                    )
        if reading.pids:
            by_uid = {t.pod_uid: t for t in targets if t.pod_uid}
            for uuid, pids in reading.pids.items():
                if uuid in owners or not by_uid:
                    continue
                for pid in pids:
                    uid = self._pod_uid(pid)
                    if uid in by_uid:
                        t = by_uid[uid]
                        owners[uuid] = Owner(t.replica_id, t.namespace, t.pod)
                        break
        if self.gpu_map:
            by_index: dict[int, list[GpuStats]] = {}
            for g in reading.gpus:
                by_index.setdefault(g.index, []).append(g)
            for endpoint, indices in self.gpu_map.items():
                t = by_address.get(endpoint) or by_id.get(endpoint)
                if t is None:
                    continue
                for i in indices:
                    for g in by_index.get(i, ()):
                        owners.setdefault(g.uuid, Owner(t.replica_id, t.namespace, t.pod))
        return owners

    def _pod_uid(self, pid: int) -> str | None:
        try:
            with open(f"{self.proc_root}/{pid}/cgroup") as f:
                return pod_uid_from_cgroup(f.read())
        except OSError:
            return None  # the process ended, or /proc is not the host's
