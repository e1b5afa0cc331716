"""`run_iteration`: one CSR iteration, generate -> curate -> train, shared by
`csr iterate` and the demo.

Every step is idempotent, so a run stopped anywhere resumes at the step it
stopped in: a generated prompt is not generated again, an existing pair set
is confirmed, and an existing model version is kept (nothing is generated or
trained again for it). How to generate is the caller's: the CLI runs its
worker processes with a progress bar, the demo one worker in process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from csr.engine.iterations import TrainOptions, TrainOutcome, curate, train
from csr.engine.settings import Settings
from csr.storage import CurationResult, Store


@dataclass(frozen=True)
class IterationOutcome:
    number: int
    curated: CurationResult | None  # None: the version was kept and the iteration never generated here
    trained: TrainOutcome | None  # None: model version `number` existed and was kept, or no pairs

    @property
    def kept(self) -> bool:
        return self.trained is None and not self.nothing_to_train

    @property
    def nothing_to_train(self) -> bool:
        return self.trained is None and self.curated is not None and self.curated.pairs == 0


def run_iteration(
    store: Store,
    settings: Settings,
    number: int,
    generate: Callable[[int], None],
    train_options: TrainOptions = TrainOptions(),
    min_margin: float = 0.0,
    pair_rule: str | None = None,
    stop_when_empty: bool = False,
) -> IterationOutcome:
    """`train_options.pair_set` names the pair set curated and trained on (default:
    the iteration's default set); `train_options.force` trains an existing version again.
    An empty pair set fails training, or with `stop_when_empty` ends the
    iteration untrained (`nothing_to_train`): a method comparison records
    that a method made no pairs instead of losing the run."""
    name = train_options.pair_set
    if store.model_version(number) is not None and not train_options.force:
        exists = store.iteration(number) is not None
        curated = curate(store, number, min_margin=min_margin, name=name, pair_rule=pair_rule) if exists else None
        return IterationOutcome(number, curated, None)
    generate(number)
    curated = curate(store, number, min_margin=min_margin, name=name, pair_rule=pair_rule)
    if stop_when_empty and curated.pairs == 0:
        return IterationOutcome(number, curated, None)
    return IterationOutcome(number, curated, train(store, settings, number, train_options))
