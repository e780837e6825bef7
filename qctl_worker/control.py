"""Remote-control handlers: the node's side of ``qctl inspect``/``qctl control`` (and Celery's).

Each handler takes the worker and the request's arguments and returns the reply value
(``{"ok": ...}``, ``{"error": ...}`` or data). Reply texts are Celery's, word for word, so
Celery's CLI and Flower read them. Handlers that change the consumer's state run on its hub
thread (``_on_hub``); read-only ones take a snapshot.
"""
from __future__ import annotations

import os
import platform
import resource
import signal as signals
import threading
import time
from typing import Any, Callable

import qctl
from qctl.protocol import TaskMessage
from qctl.transports import Envelope

from .ratelimit import parse_rate

HANDLERS: dict[str, Callable[..., Any]] = {}


def handler(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        HANDLERS[name] = fn
        return fn
    return register


NO_REPLY = object()


def dispatch(worker: Any, method: str, arguments: dict[str, Any]) -> Any:
    """Run handler ``method``; any failure (unknown command, bad arguments) is an error reply.
    Returns ``NO_REPLY`` for commands that must not be answered (shutdown)."""
    try:
        return HANDLERS[method](worker, **(arguments if isinstance(arguments, dict) else {}))
    except _NoReply:
        return NO_REPLY
    except Exception as exc:  # noqa: BLE001 - the node keeps working whatever the request
        return {"error": repr(exc)}


def _on_hub(worker: Any, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Run ``fn`` on the consumer's hub thread (which owns its state) and return its value."""
    done, box = threading.Event(), {}

    def run() -> None:
        try:
            box["value"] = fn()
        except Exception as exc:  # noqa: BLE001
            box["error"] = exc
        done.set()
    worker.consumer.call_soon(run)
    if not done.wait(timeout):
        raise TimeoutError("the worker is busy; try again")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def request_info(worker: Any, job: Any, active: bool) -> dict[str, Any]:
    """Celery's ``Request.info()`` for a job."""
    headers = job.headers
    args: Any = headers.get("argsrepr")
    kwargs: Any = headers.get("kwargsrepr")
    try:  # decoded only when someone asks
        message = TaskMessage(headers=headers, envelope=Envelope(
            job.body, headers, job.properties, job.content_type, job.content_encoding))
        message.decode_body(job.accept)
        args, kwargs = message.args, message.kwargs
    except Exception:  # noqa: BLE001 - the reprs will do
        pass
    return {"id": job.task_id, "name": job.task_name, "args": args, "kwargs": kwargs,
            "type": job.task_name, "hostname": worker.hostname,
            "time_start": (time.time() - (time.monotonic() - job.started)) if active else None,
            "acknowledged": active and job.delivery.tag is None,
            "delivery_info": {**job.delivery_info, "priority": job.delivery_info.get("priority") or 0},
            "worker_pid": job.worker_pid if active else None}


# -- inspect --------------------------------------------------------------------------------

@handler("ping")
def ping(worker: Any) -> dict:
    return {"ok": "pong"}


@handler("clock")
def clock(worker: Any) -> dict:
    return {"clock": worker.clock}


@handler("hello")
def hello(worker: Any, from_node: str | None = None, revoked: Any = None) -> Any:
    if from_node == worker.hostname:
        return None
    worker.state.revoked.update(revoked or [])
    return {"revoked": worker.state.revoked.ids(), "clock": worker.clock}


@handler("stats")
def stats(worker: Any) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    app = worker.app
    url = app.conf.effective_broker_url
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    hostpart = authority.rsplit("@", 1)[-1]
    userid = authority.rsplit("@", 1)[0].split(":", 1)[0] if "@" in authority else ""
    host, _, port = hostpart.partition(":")
    pool = dict(worker.pool.info())
    pool["timeouts"] = [worker.soft_time_limit, worker.time_limit]
    extra = {"autoscaler": worker.autoscaler.info()} if worker.autoscaler is not None else {}
    return {**extra,
        "total": dict(worker.state.total), "pid": os.getpid(), "clock": str(worker.clock),
        "uptime": int(time.monotonic() - worker.started_at), "pool": pool,
        "broker": {"hostname": host or None, "userid": userid or None,
                   "virtual_host": rest.split("/", 1)[1] if "/" in rest else "/",
                   "port": int(port) if port.isdigit() else None, "insist": False,
                   "ssl": scheme in ("rediss", "amqps"), "transport": scheme,
                   "connect_timeout": 4, "transport_options": {},
                   "login_method": "PLAIN" if scheme.startswith("amqp") else None,
                   "uri_prefix": None, "heartbeat": 120.0, "failover_strategy": "round-robin",
                   "alternates": [], "credential_provider": None},
        "prefetch_count": worker.consumer.window,
        "rusage": {"utime": usage.ru_utime, "stime": usage.ru_stime, "maxrss": usage.ru_maxrss,
                   "minflt": usage.ru_minflt, "majflt": usage.ru_majflt, "nvcsw": usage.ru_nvcsw,
                   "nivcsw": usage.ru_nivcsw},
    }


@handler("active")
def active(worker: Any, safe: Any = None) -> list:
    return [request_info(worker, job, True) for job in list(worker.consumer.active.values())]


@handler("reserved")
def reserved(worker: Any) -> list:
    consumer = worker.consumer
    jobs = list(consumer.ready)
    for waiting in list(consumer.rate_waiting.values()):
        jobs.extend(waiting)
    return [request_info(worker, job, False) for job in jobs]


@handler("scheduled")
def scheduled(worker: Any) -> list:
    from qctl.protocol import parse_iso
    out = []
    for job in list(worker.consumer.scheduled.values()):
        eta = parse_iso(job.headers.get("eta"))
        out.append({"eta": eta.isoformat() if eta else None, "priority": 6,
                    "request": request_info(worker, job, False)})
    return out


@handler("revoked")
def revoked(worker: Any) -> list:
    return worker.state.revoked.ids()


@handler("registered")
def registered(worker: Any, taskinfoitems: Any = None, builtins: bool = False) -> list:
    items = taskinfoitems or ["exchange", "routing_key", "rate_limit"]
    out = []
    for name, task in sorted(worker.app.tasks.items()):
        if name.startswith("celery.") and not builtins:
            continue
        extra = [f"{item}={getattr(task, item)}" for item in items if getattr(task, item, None) is not None]
        out.append(f"{name} [{' '.join(extra)}]" if extra else name)
    return out


#: Every key of kombu's ``Queue.as_dict(recurse=True)``: Flower's worker page reads them.
_QUEUE_KEYS = {"alias": None, "auto_delete": False, "binding_arguments": None, "bindings": [],
               "consumer_arguments": None, "durable": True, "exclusive": False, "expires": None,
               "max_length": None, "max_length_bytes": None, "max_priority": None,
               "message_ttl": None, "no_ack": False, "no_declare": None, "queue_arguments": None}
_EXCHANGE_KEYS = {"arguments": None, "auto_delete": False, "delivery_mode": None,
                  "durable": True, "no_declare": False, "passive": False, "type": "direct"}


@handler("active_queues")
def active_queues(worker: Any) -> list:
    queues = worker.app.router.queues
    out = []
    for name in list(worker.consumer.queues):
        queue = queues.get(name)
        data = queue.as_dict() if queue is not None and hasattr(queue, "as_dict") else {}
        exchange = data.get("exchange")
        if hasattr(exchange, "as_dict"):
            exchange = exchange.as_dict()
        if not isinstance(exchange, dict):
            exchange = {"name": exchange or name}
        data = {**_QUEUE_KEYS, "name": name, "routing_key": name, **data,
                "exchange": {**_EXCHANGE_KEYS, **exchange}}
        for key in ("queue_arguments", "binding_arguments", "consumer_arguments"):
            data[key] = data[key] or None  # kombu sends null, not {}
        data["exchange"]["arguments"] = data["exchange"]["arguments"] or None
        out.append(_jsonable(data))
    return out


@handler("query_task")
def query_task(worker: Any, ids: Any = None) -> dict:
    wanted = set([ids] if isinstance(ids, str) else (ids or []))
    consumer, out = worker.consumer, {}
    for state, jobs, running in (("active", consumer.active.values(), True),
                                 ("reserved", consumer.ready, False),
                                 ("scheduled", consumer.scheduled.values(), False)):
        for job in list(jobs):
            if job.task_id in wanted:
                out[job.task_id] = [state, request_info(worker, job, running)]
    return out


@handler("conf")
def conf(worker: Any, with_defaults: bool = False, **kwargs: Any) -> dict:
    return _jsonable(worker.app.conf.table(with_defaults=with_defaults, censored=True))


@handler("report")
def report(worker: Any) -> dict:
    app = worker.app
    text = (f"software -> qctl:{qctl.__version__} py:{platform.python_version()}\n"
            f"            platform -> system:{platform.system()} arch:{platform.machine()}\n"
            f"            loader -> {app.main}\nsettings -> transport:{app.safe_broker_url} "
            f"results:{app.safe_result_backend}\n\n{app.conf.humanize()}")
    return {"ok": text}


# -- control --------------------------------------------------------------------------------

@handler("rate_limit")
def rate_limit(worker: Any, task_name: str, rate_limit: Any) -> dict:
    if task_name not in worker.app.tasks:
        return {"error": "unknown task"}
    try:
        value = parse_rate(rate_limit)
    except ValueError as exc:
        return {"error": str(exc)}
    _on_hub(worker, lambda: worker.consumer.set_rate_limit(task_name, rate_limit if value else None))
    if not value:
        return {"ok": "rate limit disabled successfully"}
    return {"ok": "new rate limit set successfully"}


@handler("time_limit")
def time_limit(worker: Any, task_name: str, hard: Any = None, soft: Any = None) -> dict:
    if task_name not in worker.app.tasks:
        return {"error": "unknown task"}
    task = worker.app.tasks[task_name]

    def apply() -> None:
        task.soft_time_limit, task.time_limit = soft, hard
        worker.consumer.time_limits[task_name] = (soft, hard)
    _on_hub(worker, apply)
    return {"ok": "time limits set successfully"}


@handler("revoke")
def revoke(worker: Any, task_id: Any, terminate: bool = False, signal: Any = "SIGTERM",
           **kwargs: Any) -> dict:
    ids = [task_id] if isinstance(task_id, str) else list(task_id or [])
    worker.state.revoked.update(ids)
    worker.state.save()
    if not terminate:
        return {"ok": f"tasks {set(ids)!r} flagged as revoked"}
    signum = _signum(signal)
    hit = _on_hub(worker, lambda: worker.consumer.terminate(ids, signum))
    return {"ok": f"terminate: {', '.join(hit)}" if hit else "terminate: tasks unknown"}


@handler("terminate")
def terminate(worker: Any, task_id: Any, signal: Any = "SIGTERM", **kwargs: Any) -> dict:
    return revoke(worker, task_id, terminate=True, signal=signal)


def _signum(value: Any) -> int:
    if isinstance(value, int):
        return value
    name = str(value).upper()
    return int(getattr(signals, name if name.startswith("SIG") else "SIG" + name))


@handler("enable_events")
def enable_events(worker: Any) -> dict:
    if worker.events:
        return {"ok": "task events already enabled"}
    worker.events = True
    return {"ok": "task events enabled"}


@handler("disable_events")
def disable_events(worker: Any) -> dict:
    if not worker.events:
        return {"ok": "task events already disabled"}
    worker.events = False
    return {"ok": "task events disabled"}


@handler("heartbeat")
def heartbeat(worker: Any) -> None:
    worker.remote.send_worker_event("worker-heartbeat", freq=5.0)
    return None


@handler("add_consumer")
def add_consumer(worker: Any, queue: str, exchange: Any = None, exchange_type: str = "direct",
                 routing_key: Any = None, **options: Any) -> dict:
    consumer = worker.consumer
    if queue in consumer.queues:
        return {"ok": f"already consuming from {queue}"}
    worker.app.transport.declare_queue(queue)
    consumer.queues = consumer.queues + [queue]  # the fetcher reads the list afresh each time
    return {"ok": f"add consumer {queue}"}


@handler("cancel_consumer")
def cancel_consumer(worker: Any, queue: str, **kwargs: Any) -> dict:
    consumer = worker.consumer
    if queue not in consumer.queues:
        return {"ok": f"no longer consuming from {queue}"}
    consumer.queues = [q for q in consumer.queues if q != queue]
    return {"ok": f"no longer consuming from {queue}"}


@handler("pool_grow")
def pool_grow(worker: Any, n: int = 1, **kwargs: Any) -> dict:
    if worker.autoscaler is not None:
        return {"error": "pool_grow is not supported with autoscale. Adjust autoscale range instead."}
    _on_hub(worker, lambda: worker.resize_pool(int(n)))
    return {"ok": "pool will grow"}


@handler("pool_shrink")
def pool_shrink(worker: Any, n: int = 1, **kwargs: Any) -> dict:
    if worker.autoscaler is not None:
        return {"error": "pool_shrink is not supported with autoscale. Adjust autoscale range instead."}
    _on_hub(worker, lambda: worker.resize_pool(-int(n)))
    return {"ok": "pool will shrink"}


@handler("autoscale")
def autoscale(worker: Any, max: Any = None, min: Any = None, **kwargs: Any) -> dict:  # noqa: A002
    scaler = worker.autoscaler
    if scaler is None:
        return {"error": "ValueError('Autoscale not enabled')"}
    _on_hub(worker, lambda: scaler.update(max, min))
    return {"ok": f"autoscale now max={scaler.max} min={scaler.min}"}


@handler("pool_restart")
def pool_restart(worker: Any, modules: Any = None, reload: bool = False, **kwargs: Any) -> dict:
    """Replace every pool process once its current task ends (new code on disk is loaded
    by the new processes); only with ``worker_pool_restarts``, as in Celery."""
    if not worker.app.conf.get("worker_pool_restarts"):
        return {"error": "ValueError('Pool restarts not enabled')"}
    restart = getattr(worker.pool, "restart", None)
    if restart is None:
        return {"error": f"ValueError('the {worker.pool_name} pool has no processes to restart')"}
    for module in modules or ():
        __import__(module)
    restart()
    return {"ok": "reload started"}


@handler("shutdown")
def shutdown(worker: Any, **kwargs: Any) -> None:
    import logging
    logging.getLogger("qctl.worker").warning("Got shutdown from remote")
    worker.request_stop()
    raise _NoReply()


class _NoReply(Exception):
    """Raised by handlers that must not answer (shutdown, as Celery)."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


__all__ = ["HANDLERS", "NO_REPLY", "dispatch", "handler", "request_info"]
