"""Problems for training and held-out evaluation: the built-in arithmetic task or a dataset."""
from __future__ import annotations

import logging

from fastdash.data.arithmetic import make_problems
from fastdash.data.chat import prompt_key, render_prompt
from fastdash.data.multiplication import make_problems as make_multiplication
from fastdash.data.word_problems import make_word_problems

__all__ = ["load_task", "prompt_key", "render_prompt"]
BUILTIN = {"arithmetic": make_problems, "arithmetic_chat": make_word_problems, "multiplication": make_multiplication}

log = logging.getLogger("fastdash")


def load_task(cfg) -> tuple[list[dict], list[dict]]:
    """(train problems, held-out problems). Each problem has `prompt` (text or a list of chat
    messages, see `fastdash.data.chat`) and `answer` at least."""
    if cfg.task in BUILTIN and cfg.dataset is None:
        make = BUILTIN[cfg.task]
        return (make(cfg.num_train_problems, split="train", seed=cfg.seed),
                make(cfg.num_eval_problems, split="heldout", seed=0))
    from fastdash.data.loaders import load_problems

    train = load_problems(cfg.dataset, task=cfg.task, split=cfg.dataset_split, prompt_template=cfg.prompt_template)
    if cfg.eval_dataset:
        evals = load_problems(cfg.eval_dataset, task=cfg.task, split=cfg.eval_split,
                              prompt_template=cfg.prompt_template, limit=cfg.num_eval_problems)
        return train, evals
    # No eval set given: hold out the tail of the training data so eval never sees trained problems.
    n_eval = min(cfg.num_eval_problems, len(train) // 5)
    if n_eval == 0:
        raise ValueError(f"dataset {cfg.dataset!r} has {len(train)} usable rows: too few to hold any out; "
                         "pass eval_dataset=PATH")
    log.info("no eval_dataset given: holding out the last %d of %d rows of %s for evaluation",
             n_eval, len(train), cfg.dataset)
    return train[:-n_eval], train[-n_eval:]
