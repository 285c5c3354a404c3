"""The NVML GPU source: every GPU and MIG slice on the node through pynvml.

pynvml is imported here only, when this source is built, so nothing else pays for it. NVML calls
block, so a read runs in a worker thread. Any NVML error on one device (GPU fallen off the bus,
a query the board does not support) marks that device unhealthy with the error and the rest of
the node is read as usual; fields a board cannot report (power on some MIG setups, GPM before
Hopper) stay None.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from agent.errors import ErrorLog
from agent.gpus import GpuReading
from kvpilot.signals import GpuStats

log = logging.getLogger("kvpilot.agent")


class NvmlUnavailable(RuntimeError):
    """No NVML on this machine (no driver, no GPU): the agent cannot use the nvml source."""


class NvmlGpuSource:
    def __init__(self, errors: ErrorLog) -> None:
        try:
            import pynvml
        except ImportError as e:  # pragma: no cover - nvidia-ml-py is a dependency
            raise NvmlUnavailable(f"pynvml is not installed: {e}") from e
        self.nv: Any = pynvml
        self.errors = errors
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(f"NVML did not start (no NVIDIA driver or GPU?): {e}") from e
        self._gpm_prev: dict[int, Any] = {}  # device index -> previous GPM sample
        self._gpm_supported: dict[int, bool] = {}

    async def read(self, endpoints: Sequence[str]) -> GpuReading:
        return await asyncio.to_thread(self.read_sync)

    def read_sync(self) -> GpuReading:
        nv = self.nv
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as e:
            self.errors.report("gpu", "nvml", f"device count: {e}")
            return GpuReading()
        gpus: list[GpuStats] = []
        pids: dict[str, tuple[int, ...]] = {}
        for i in range(count):
            for stats, procs in self._device(i):
                gpus.append(stats)
                if procs:
                    pids[stats.uuid] = procs
        return GpuReading(gpus=tuple(gpus), pids=pids)

    def _device(self, i: int) -> list[tuple[GpuStats, tuple[int, ...]]]:
        nv = self.nv
        key = f"gpu{i}"
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
            uuid = _str(nv.nvmlDeviceGetUUID(h))
            name = _str(nv.nvmlDeviceGetName(h))
        except nv.NVMLError as e:
            self.errors.report("gpu", key, str(e))
            unhealthy = GpuStats(
                uuid=f"unknown-{i}", index=i, name="", hbm_used_bytes=0, hbm_total_bytes=0,
                util=0.0, mem_bw_util=0.0, healthy=False, error=str(e),
            )  # fmt: skip
            return [(unhealthy, ())]
        try:
            used, total = self._memory(h)
        except nv.NVMLError as e:
            return [(self._unhealthy(key, uuid, i, name, e), ())]
        util = mem_util = 0.0
        try:
            rates = nv.nvmlDeviceGetUtilizationRates(h)
            util, mem_util = rates.gpu / 100.0, rates.memory / 100.0
        except nv.NVMLError as e:
            if not _not_supported(nv, e):
                return [(self._unhealthy(key, uuid, i, name, e), ())]
        power = _optional(nv, lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
        temp = _optional(nv, lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
        clock = _optional(nv, lambda: int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))
        sm_active, bw = self._gpm(i, h)
        procs = self._pids(h)
        self.errors.clear(key)
        migs = self._mig_slices(h, i, name, util, power, temp, clock)
        if migs:
            return migs
        return [
            (
                GpuStats(
                    uuid=uuid, index=i, name=name, hbm_used_bytes=used, hbm_total_bytes=total,
                    util=util, mem_bw_util=bw if bw is not None else mem_util,
                    sm_active=sm_active, power_w=power, temp_c=temp, sm_clock_mhz=clock,
                ),
                procs,
            )
        ]  # fmt: skip

    def _memory(self, h: Any) -> tuple[int, int]:
        nv = self.nv
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)
        except nv.NVMLError:
            mem = nv.nvmlDeviceGetMemoryInfo(h)  # v1, where the driver lacks v2
        # v2's `used` leaves out what the driver reserves, so it is what processes allocated.
        return int(mem.used), int(mem.total)

    def _unhealthy(self, key: str, uuid: str, i: int, name: str, e: Exception) -> GpuStats:
        self.errors.report("gpu", key, str(e))
        return GpuStats(
            uuid=uuid, index=i, name=name, hbm_used_bytes=0, hbm_total_bytes=0, util=0.0,
            mem_bw_util=0.0, healthy=False, error=str(e),
        )  # fmt: skip

    def _pids(self, h: Any) -> tuple[int, ...]:
        nv = self.nv
        try:
            return tuple(int(p.pid) for p in nv.nvmlDeviceGetComputeRunningProcesses(h))
        except nv.NVMLError:
            return ()

    def _mig_slices(
        self, h: Any, i: int, name: str, util: float, power: float | None, temp: float | None,
        clock: int | None,
    ) -> list[tuple[GpuStats, tuple[int, ...]]]:  # fmt: skip
        """Each MIG instance as its own GpuStats (its memory; the parent's duty cycle)."""
        nv = self.nv
        try:
            current, _pending = nv.nvmlDeviceGetMigMode(h)
            if current != nv.NVML_DEVICE_MIG_ENABLE:
                return []
            n = nv.nvmlDeviceGetMaxMigDeviceCount(h)
        except nv.NVMLError:
            return []  # MIG not supported on this board
        out = []
        for m in range(n):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, m)
            except nv.NVMLError:
                continue  # slot not populated
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(mh)
                stats = GpuStats(
                    uuid=_str(nv.nvmlDeviceGetUUID(mh)), index=i, name=name,
                    hbm_used_bytes=int(mem.used), hbm_total_bytes=int(mem.total), util=util,
                    mem_bw_util=0.0, power_w=power, temp_c=temp, sm_clock_mhz=clock,
                    mig_instance=str(nv.nvmlDeviceGetGpuInstanceId(mh)),
                )  # fmt: skip
            except nv.NVMLError as e:
                self.errors.report("gpu", f"gpu{i}/mig{m}", str(e))
                continue
            out.append((stats, self._pids(mh)))
        return out

    def _gpm(self, i: int, h: Any) -> tuple[float | None, float | None]:
        """SM activity and DRAM bandwidth (0-1) from two GPM samples, on GPUs that have GPM."""
        nv = self.nv
        if self._gpm_supported.get(i) is False:
            return None, None
        try:
            if i not in self._gpm_supported:
                self._gpm_supported[i] = bool(nv.nvmlGpmQueryDeviceSupport(h).isSupportedDevice)
                if not self._gpm_supported[i]:
                    return None, None
            sample = nv.nvmlGpmSampleGet(h, nv.nvmlGpmSampleAlloc())
            prev = self._gpm_prev.get(i)
            self._gpm_prev[i] = sample
            if prev is None:
                return None, None
            req = nv.c_nvmlGpmMetricsGet_t()
            req.version = nv.NVML_GPM_METRICS_GET_VERSION
            req.numMetrics = 2
            req.sample1, req.sample2 = prev, sample
            req.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
            req.metrics[1].metricId = nv.NVML_GPM_METRIC_DRAM_BW_UTIL
            nv.nvmlGpmMetricsGet(req)
            nv.nvmlGpmSampleFree(prev)
            return req.metrics[0].value / 100.0, req.metrics[1].value / 100.0
        except (nv.NVMLError, AttributeError) as e:
            self._gpm_supported[i] = False  # an old driver or board: stop asking
            log.info("gpu%d: GPM metrics unavailable (%s); SM activity not reported", i, e)
            return None, None

    async def close(self) -> None:
        with contextlib.suppress(self.nv.NVMLError):
            self.nv.nvmlShutdown()


def _str(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _not_supported(nv: Any, e: Exception) -> bool:
    return getattr(e, "value", None) == nv.NVML_ERROR_NOT_SUPPORTED


def _optional(nv: Any, fn: Any) -> Any:
    try:
        return fn()
    except nv.NVMLError:
        return None
