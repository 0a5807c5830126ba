"""FedAvg that asks every site each round and carries on when at least ``min_responses`` answer."""

from __future__ import annotations

from nvflare.app_common.workflows.fedavg import FedAvg


class FaultTolerantFedAvg(FedAvg):
    """Sends each round to all connected sites; the round closes once every site answered, or once
    ``min_responses`` did and ``wait_after_min_s`` more seconds passed (a dead or disconnected site
    then simply misses the round). A site's failure is ignored while ``min_responses`` stays reachable.
    """

    def __init__(self, *args, min_responses: int = 0, wait_after_min_s: int = 60, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_responses = min_responses
        self.wait_after_min_s = wait_after_min_s

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        return super().sample_clients(None)  # every connected site, not a sample

    def send_model(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0, callback=None):
        self.broadcast_model(task_name=task_name, data=data, targets=targets,
                             min_responses=self.min_responses or min_responses, timeout=timeout,
                             wait_time_after_min_received=self.wait_after_min_s, blocking=False, callback=callback)
