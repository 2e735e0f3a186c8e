"""embedded_worker: the PROCESSING worker of ServiceProcessing, loaded in-process.

    from embedded_worker import ProcessingWorker
    with ProcessingWorker() as worker:
        reply = worker.execute_workflow(workflow_id="img-generation-basic",
                                        parameters={"prompt": "a red fox", "seed": 7}, background=False)
        pixels = worker.get_output(reply["outputs"][0]["output_id"])  # uint8 HxWx3, zero-copy
"""

from .api.facade import ProcessingWorker
from .config import WorkerConfig
from .progress.batch_tracker import BatchProgressTracker

__version__ = "0.1.0"
__all__ = ["BatchProgressTracker", "ProcessingWorker", "WorkerConfig", "__version__"]
