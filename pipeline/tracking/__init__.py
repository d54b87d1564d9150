"""Every MLflow call of segpipe lives under this package (nothing else imports mlflow).

- store.py: tracking URI resolution, clients, pre-flight, HTTP retry bounds, experiments, rehoming.
- throttle.py: the failed-login throttle of `segpipe mlflow-server --auth` (LoginThrottle).
- runs.py: run creation with the standard tags, metrics, status, the one paginated search, the
  report tag, the UI compare link, checkpoint artifacts; a store failure mid-run as one line
  (store_failure, StoreFailed).
- train/tune/report-specific helpers live in their own modules here (``tracking.<stage>``).
"""

from pipeline.tracking.runs import (CHECKPOINT_ARTIFACT, IN_REPORT_TAG, compare_filter, compare_url, data_tags,
                                    download_checkpoint, end_run, ending_run, find_experiment, log_metrics, mark_in_report,
                                    search_runs, start_run, store_failure, StoreFailed)
from pipeline.tracking.store import (HTTP_RETRY_ENV, EXPERIMENT_KIND, bounded_http_retries, client, experiment_id,
                                     fluent_uri, preflight, rehome_store, resolve_tracking_uri,
                                     server_env)

__all__ = ["CHECKPOINT_ARTIFACT", "EXPERIMENT_KIND", "HTTP_RETRY_ENV", "IN_REPORT_TAG", "bounded_http_retries", "client", "compare_filter",
           "compare_url", "data_tags", "download_checkpoint", "end_run", "ending_run", "experiment_id", "find_experiment",
           "fluent_uri", "log_metrics", "mark_in_report", "preflight", "rehome_store", "resolve_tracking_uri",
           "search_runs", "server_env", "start_run", "store_failure", "StoreFailed"]
