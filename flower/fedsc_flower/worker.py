"""A long-lived ClientApp process for one SuperNode (Flower's process isolation).

By default a SuperNode starts a new `flwr-clientapp` process for every message, which imports flwr,
torch and the repository again and gets the site's state back from the SuperNode's context: seconds
per message. Started with `flower-supernode --isolation process`, the SuperNode starts nothing; this
worker asks its Runtime API for tasks and runs each in this one process, so the imports happen once
and the site keeps its state in this process's memory (client_app.KEPT) instead of context.state.
It runs only this app's ClientApp (fedsc_flower.client_app), and listens to nothing: it connects to
its own SuperNode's Runtime API, on the site's machine.

    python -m fedsc_flower.supernode --isolation process --port 9094 ...   # Runtime API on 127.0.0.1:9094
    python -m fedsc_flower.worker --runtime-api-address 127.0.0.1:9094 --insecure
"""
import argparse
import os
import traceback

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedsc_flower import client_app, waits


waits.shorten(run_clientapp)  # a task is handed out before the SuperNode holds the message's objects


def connect(address, certificates, *interceptors):
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=certificates is None,
                                                 root_certificates=certificates, interceptors=list(interceptors),
                                                 retry_invoker=make_simple_http_retry_invoker())


def run_task(address, certificates, token):
    """What flwr-clientapp does for one token, in this process: pull the message and context, call the
    ClientApp, push its reply and the task's status."""
    client = connect(address, certificates, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                     RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = None
    status, details = SubStatus.COMPLETED, ""
    try:
        message, context, run, _ = pull_task_input(client)
        if run.fab_id.split("/")[-1] != "fedsc-flower":
            raise RuntimeError(f"this worker runs the fedsc-flower app only, not {run.fab_id}")
        reply = client_app.app(message=message, context=context)
    except Exception as e:  # the worker goes on serving; the server gets the error as flwr-clientapp sends it
        traceback.print_exc()
        status, details = SubStatus.FAILED, f"{type(e)}:<'{e}'>"
        reply = None if message is None else Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                                     reply_to=message)
    try:
        if reply is not None:
            push_message(client, reply, context)
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's Runtime API (its --port)")
    p.add_argument("--insecure", action="store_true", help="the Runtime API without TLS (the SuperNode's default)")
    p.add_argument("--root-certificates", default="", help="CA certificate of the Runtime API's TLS (its --ssl-certfile)")
    a = p.parse_args()
    if not a.insecure and not a.root_certificates:
        p.error("give --insecure or --root-certificates, as the SuperNode's Runtime API is configured")
    certificates = None if a.insecure else open(a.root_certificates, "rb").read()
    client_app.KEPT_IN_PROCESS = True
    runtime = connect(a.runtime_api_address, certificates, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    print(f"fedsc worker (pid {os.getpid()}) serving {a.runtime_api_address}", flush=True)
    backoff = waits.Backoff()
    try:
        while True:
            res = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                run_task(a.runtime_api_address, certificates, res.token)
                backoff.reset()
            else:
                backoff.wait()
    except KeyboardInterrupt:
        print("fedsc worker stopped", flush=True)


if __name__ == "__main__":
    main()
