"""Stage 1/2 of the recipe: SimCLR or MICLe pretraining from a PretrainConfig.

`run_pretraining(cfg)` trains a `ContrastiveModel` on per-replica datasets of case-bag records
in `cfg.data_dir` (or of a prepared TFDS image dataset `cfg.tfds_name` in `cfg.tfds_data_dir`,
see `data_pipelines.tfds_source`), resuming from the newest checkpoint in `cfg.model_dir` (or
starting the encoder from `cfg.init_checkpoint`), and writes `pretrain_summary.json` with a
`learning_health` block (see `learning_health`). What every run shares (seeding, strategy,
optimizer, resume, the fit loop, the summary's core) is `runner.Run`; the model_dir layout is
`micle_tf.rundir`'s.
"""
from data_pipelines import reader
from data_pipelines.writer import read_info
from micle_tf import augment, config as config_lib, rundir
from micle_tf.losses import chance_contrastive_accuracy, uniform_logits_loss
from micle_tf.models.contrastive import METHODS, ContrastiveModel
from micle_tf.models.factory import build_encoder, build_projection_head
from micle_tf.rundir import load_encoder_weights
from micle_tf.training import callbacks as cb
from micle_tf.training.runner import Run, continued, last

SUMMARY_FILE = rundir.PRETRAIN_SUMMARY_FILE
CONFIG_FILE = rundir.PRETRAIN_CONFIG_FILE


def build_pretraining_model(cfg, num_classes=0, task="multiclass"):
    """The ContrastiveModel a PretrainConfig describes, every variable created (inside
    strategy.scope() when training)."""
    encoder = build_encoder(cfg.model)
    head = build_projection_head(cfg.model)
    device_augment = cfg.augment if cfg.augment_placement == "device" else None
    model = ContrastiveModel(encoder, head, temperature=cfg.temperature, method=cfg.method,
                             num_classes=num_classes, task=task, device_augment=device_augment,
                             image_size=cfg.model.image_size,
                             color_jitter_strength=cfg.color_jitter_strength,
                             name=f"{cfg.method}_model")
    model.build_for(cfg.model.image_size)
    return model


def run_pretraining(cfg):
    """Trains and returns the summary dict (also written to model_dir/pretrain_summary.json)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown --method {cfg.method!r} (simclr, micle)")
    aug = augment.build_augment(cfg.augment, cfg.model.image_size, cfg.augment_placement,
                                color_jitter_strength=cfg.color_jitter_strength,
                                crop_area_min=cfg.crop_area_min)
    if cfg.cache_decoded and cfg.tfds_name:
        raise ValueError("cache_decoded applies to micle-data records, not --tfds_name")
    run = Run(cfg)
    source = _Source(cfg)
    split = source.info["splits"].get(cfg.train_split)
    if not split:
        raise ValueError(f"{cfg.tfds_name or cfg.data_dir} has no {cfg.train_split!r} split "
                         f"(splits: {sorted(source.info['splits'])})")
    labelled = bool(source.info["label_names"])
    run.plan(split["cases"])
    probe_classes = len(source.info["label_names"]) if (cfg.linear_probe and labelled) else 0
    with run.strategy.scope():
        model = run.compile(build_pretraining_model(cfg, probe_classes, source.info["task"]))
        run.restore((lambda: load_encoder_weights(model.encoder, cfg.init_checkpoint))
                    if cfg.init_checkpoint else None)
    run.log_start(f"{cfg.method} pretraining of {cfg.model.backbone}")
    facts = rundir.dataset_facts(source.info)
    run.write(CONFIG_FILE, {"config": config_lib.to_dict(cfg), "dataset": facts})

    callbacks, knn = [], None
    if cfg.knn_monitor and cfg.eval_split in source.info["splits"] and run.chief:
        knn = cb.KnnMonitor(source.eval_data(cfg.train_split, run.eval_batch_size)
                            if labelled else None,
                            source.eval_data(cfg.eval_split, run.eval_batch_size),
                            source.info["task"])
        callbacks.append(knn)
    health = cb.LearningHealthMonitor(run.warmup_steps, global_batch=cfg.batch_size)
    callbacks.append(health)  # before TensorBoard: it adds contrastive_accuracy_over_chance
    history = run.fit(lambda first_epoch: source.train_data(run, aug, first_epoch), callbacks,
                      shard_check=source.shard_check)
    # a run resumed after it finished (e.g. more --train_steps) keeps the earlier history
    previous = run.previous_summary(SUMMARY_FILE)
    history = continued(previous, history)
    summary = run.summary(
        history, facts, previous=previous, method=cfg.method,
        final_contrastive_accuracy=last(history, "contrastive_accuracy"),
        learning_health=learning_health(history, cfg.batch_size, run.warmup_steps,
                                        int(model.optimizer.iterations.numpy()), health),
        knn_monitor=list((previous or {}).get("knn_monitor") or []) +
        (knn.history if knn else []))
    run.write(SUMMARY_FILE, summary)
    return summary


class _Source:
    """Where pretraining reads its images: micle-data records, or (stage 1) a prepared TFDS
    image dataset in which each image is its own case."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.builder = None
        if cfg.tfds_name:
            from data_pipelines import tfds_source  # only here: it needs tensorflow_datasets
            self.tfds = tfds_source
            self.builder = tfds_source.load_builder(cfg.tfds_name, cfg.tfds_data_dir)
            self.info = tfds_source.describe(self.builder)
        else:
            self.info = read_info(cfg.data_dir)

    def train_data(self, run, aug, first_epoch):
        cfg = self.cfg
        kwargs = dict(augment_fn=aug, seed=cfg.seed, steps_per_epoch=run.steps_per_epoch,
                      start_epoch=first_epoch)
        if self.builder is not None:
            return self.tfds.distributed_tfds_dataset(
                run.strategy, cfg.tfds_name, cfg.tfds_data_dir, cfg.train_split, cfg.method,
                cfg.batch_size, cfg.model.image_size, builder=self.builder, **kwargs)
        return reader.distributed_dataset(
            run.strategy, cfg.data_dir, cfg.train_split, cfg.method, cfg.batch_size,
            cfg.model.image_size, info=self.info, cache_decoded=cfg.cache_decoded, **kwargs)

    def eval_data(self, split, batch_size):
        """A function making the (supervised, unaugmented) dataset of `split`."""
        cfg = self.cfg
        if self.builder is not None:
            return lambda: self.tfds.make_tfds_dataset(
                cfg.tfds_name, cfg.tfds_data_dir, split, "supervised", batch_size,
                cfg.model.image_size, training=False, builder=self.builder)
        return lambda: reader.make_dataset(cfg.data_dir, split, "supervised", batch_size,
                                           cfg.model.image_size, training=False, info=self.info)

    def shard_check(self):
        """Names the damaged shard after a DataLossError (records only)."""
        if self.builder is None:
            reader.verify_shards(self.cfg.data_dir, self.cfg.train_split, info=self.info,
                                 parse=False)


def learning_health(history, global_batch, warmup_steps, final_step, monitor=None, factor=2.0):
    """The summary's `learning_health` block: is the contrastive task being learned?

    `global_batch` is B, the global batch (negatives are gathered across replicas): chance
    contrastive accuracy 1/(2B-1), and `uniform_loss` = 2 ln(2B-1), the contrastive loss for
    all-equal logits (`losses.nt_xent_loss` sums the two directions' mean cross-entropies over
    2B-1 candidates). The `final_*` values are the last epoch's means; `final_loss` is the
    CONTRASTIVE loss (the summary's top-level `final_loss` also includes a linear probe's loss).
    `learning` is final accuracy > `factor` x chance, judged only when the run ended after the
    warmup (else None, as when no epoch was trained). `warning` is the message the
    `LearningHealthMonitor` logged (the first post-warmup epoch within 2x chance), or, without a
    monitor, the same message when the final epoch is not learning; None otherwise.
    """
    chance = chance_contrastive_accuracy(global_batch)
    acc = last(history, "contrastive_accuracy")
    judged = acc is not None and final_step > warmup_steps and factor * chance < 1.0
    learning = bool(acc > factor * chance) if judged else None
    warning = monitor.warning if monitor is not None else None
    if warning is None and monitor is None and learning is False:
        warning = cb.not_learning_message(acc, chance, final_step, warmup_steps, factor)
    return {
        "global_batch": int(global_batch),
        "chance_contrastive_accuracy": chance,
        "uniform_loss": uniform_logits_loss(global_batch),
        "final_contrastive_accuracy": acc,
        "final_loss": last(history, "contrastive_loss"),
        "accuracy_over_chance": None if acc is None else acc / chance,
        "final_alignment": last(history, "alignment"),
        "final_uniformity": last(history, "uniformity"),
        "learning": learning,
        "warning": warning,
    }
