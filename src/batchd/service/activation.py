"""Starting a batch: the checks that need both the batch and its validated file.

A batch is created in ``validating``, then moves to ``in_progress`` (with its shards) or
``failed`` (with every problem and its line). Called when a batch is created, and by the
engine's sweep for a batch that a crash left in ``validating``; it is idempotent.
"""

from __future__ import annotations

import logging

from batchd.config import Deployment, Settings
from batchd.errors import QuotaExceeded
from batchd.models import MESSAGES_ENDPOINT, BatchRecord, ValidationIssue, now
from batchd.service.validation import MAX_ISSUES, mismatched_lines
from batchd.store.protocols import BatchStore, FileStore
from batchd.telemetry.logs import about
from batchd.tokens import InputCounter

log = logging.getLogger(__name__)


def _unserved(model: str, deployment: Deployment | None, endpoint: str) -> str | None:
    """Why no deployment runs ``model`` for ``endpoint``, or None when one does. A deployment
    with ``api_style = "anthropic"`` serves only :data:`MESSAGES_ENDPOINT`, and that endpoint
    runs only there (a message batch for any other deployment is translated instead)."""
    if deployment is None:
        return f"no deployment serves the model {model!r}."
    if deployment.speaks_messages and endpoint != MESSAGES_ENDPOINT:
        return (
            f"the deployment of model {model!r} speaks Anthropic's {MESSAGES_ENDPOINT} "
            f"(api_style 'anthropic'): it runs message batches, not {endpoint}."
        )
    if endpoint == MESSAGES_ENDPOINT and not deployment.speaks_messages:
        return (
            f"the deployment of model {model!r} does not speak {MESSAGES_ENDPOINT} "
            "(its api_style is not 'anthropic')."
        )
    return None


class Activator:
    def __init__(
        self,
        settings: Settings,
        files: FileStore,
        batches: BatchStore,
        counter: InputCounter | None = None,
    ) -> None:
        """``counter``: counts a batch's tokens with its model's tokenizer when a token
        quota applies (without one, the upload's ``bytes / 4`` estimate is used)."""
        self._settings = settings
        self._files = files
        self._batches = batches
        self._counter = counter

    async def activate(self, batch: BatchRecord, *, defer_counting: bool = False) -> None:
        """Start the batch, or fail it. With ``defer_counting`` (a create request), a batch
        whose tokens must be counted stays ``validating``: the engine's sweep counts and
        starts it, so a create never waits on counting a large file."""
        file = await self._files.get_file(batch.input_file_id)
        if file is None:
            issue = ValidationIssue(
                "invalid_request",
                f"The input file {batch.input_file_id} was deleted.",
                None,
                "input_file_id",
            )
            await self._batches.fail_batch(batch.id, [issue], now())
            return
        if file.summary is None:
            return  # not a checked batch input: refused when the batch was created
        summary = file.summary
        issues = list(summary.issues)
        issues.extend(
            ValidationIssue(
                "url_mismatch",
                f"Line {line}: url {url!r} does not match the batch endpoint "
                f"{batch.endpoint!r}.",
                line,
                "url",
            )
            for line, url in mismatched_lines(summary, batch.endpoint)
        )
        model = next(iter(summary.models), None)
        deployment = self._settings.deployment_for(model) if model else None
        if model and len(summary.models) == 1:
            why = _unserved(model, deployment, batch.endpoint)
            if why is not None:
                first_line = summary.models[model][1]
                issues.append(
                    ValidationIssue(
                        "model_not_found", f"Line {first_line}: {why}", first_line, "body.model"
                    )
                )
        at = now()
        if issues:
            issues.sort(key=lambda i: i.line or 0)
            await self._batches.fail_batch(batch.id, issues[:MAX_ISSUES], at, model=model)
            first = issues[0]
            where = f"line {first.line} " if first.line else ""
            log.info(
                "batch %s (project %s) failed validation: %d problems, first: %s%s",
                batch.id,
                batch.project,
                len(issues),
                where,
                first.code,
                extra=about(batch),
            )
            return
        limit = deployment.enqueued_token_limit if deployment is not None else 0
        project_limit = self._settings.project_token_limit(batch.project)
        tokens = summary.token_estimate
        if (limit or project_limit) and self._counter is not None:
            if defer_counting:
                return  # counted while the batch waits in validating (the engine's sweep)
            tokens = await self._counter.count(file.blob_key)
            at = now()
        try:
            await self._batches.activate_batch(
                batch.id,
                model=model,
                spans=summary.shards,
                token_estimate=tokens,
                at=at,
                token_limit=limit,
                project_token_limit=project_limit,
            )
        except QuotaExceeded as exc:  # checked and taken atomically by the store
            of = f"project {batch.project}" if exc.scope == "project" else str(model)
            cap = project_limit if exc.scope == "project" else limit
            # A deployment's quota is shared by every project: how much of it others use
            # is theirs to know, so only the project's own quota names what is enqueued.
            enqueued = f"{exc.used} tokens are enqueued and " if exc.scope == "project" else ""
            issue = ValidationIssue(
                "token_limit_exceeded",
                f"Enqueued token limit reached for {of}: {enqueued}this batch needs {tokens}; "
                f"the limit is {cap}. Try again after some batches end.",
                None,
                None,
            )
            await self._batches.fail_batch(batch.id, [issue], at, model=model)
            log.info(
                "batch %s (project %s) failed: enqueued token limit of %s",
                batch.id,
                batch.project,
                of,
                extra=about(batch),
            )
            return
        log.info(
            "batch %s (project %s) in progress: %d requests",
            batch.id,
            batch.project,
            summary.lines,
            extra=about(batch),
        )
