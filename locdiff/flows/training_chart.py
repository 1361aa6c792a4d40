"""The live training chart in the Prefect UI: one markdown artifact per run, created at the first
refresh and updated in place after (``update_artifact`` also moves its key's "latest" view), so the
run's Artifacts tab shows one chart that grows, not one version per refresh.

Markdown with an inline PNG (a data URI) is what the UI renders as a picture without access to the
store (the same way the evaluation report shows its figures); Prefect's image artifact needs a URL
the browser can reach, which an S3 store on a private network is not.
"""

from __future__ import annotations

import logging

from locdiff.curves import chart_markdown


class TrainingChart:
    """``on_curves`` of ``train_run``: renders the curves so far and publishes them as one artifact.
    Outside a Prefect run (plain ``.fn()`` calls, the CLI's local runs) it does nothing."""

    def __init__(self, max_steps: int, batch_size: int) -> None:
        self.max_steps, self.batch_size = int(max_steps), int(batch_size)
        self.artifact_id = None
        self.refreshes = 0
        try:
            from prefect.context import get_run_context

            get_run_context()
            self.active = True
        except Exception:  # noqa: BLE001 - no run context: nothing to publish to
            self.active = False

    def __call__(self, run_key: str, curves: dict) -> None:
        if not self.active:
            return
        from prefect.artifacts import create_markdown_artifact
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        from locdiff.stages.reports import slug

        markdown = chart_markdown(run_key, curves, self.max_steps, self.batch_size)
        if self.artifact_id is None:
            name = run_key.split("/", 1)[1].rsplit("/", 1)[0]
            self.artifact_id = create_markdown_artifact(
                markdown=markdown,
                key=f"training-{slug(name)}"[:100],
                description=f"training curves of {run_key}, refreshed while it trains",
            )
        else:
            get_client(sync_client=True).update_artifact(self.artifact_id, ArtifactUpdate(data=markdown))
        self.refreshes += 1
        logging.getLogger("locdiff.runs").debug("training chart of %s refreshed", run_key)
