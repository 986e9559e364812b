"""flower-supernode with the waits of fedsc_flower.waits: `python -m fedsc_flower.supernode` takes every
option of flower-supernode. Run it with `--isolation process` and the site's long-lived ClientApp
process beside it (fedsc_flower/worker.py); docs/flower.md shows both."""
from flwr.supernode import start_client_internal
from flwr.supernode.cli.flower_supernode import flower_supernode

from fedsc_flower import waits

waits.shorten(start_client_internal)
start_client_internal.time = waits.ShortSleep()  # its 3 s wait for a message, its 0.5 s looks for a reply

if __name__ == "__main__":
    flower_supernode()
