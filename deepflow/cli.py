"""The ``deepflow`` command: ``deepflow COMMAND [flags] [--config.KEY=VALUE ...]``.

Each command is a function below, marked with ``@command`` (the flags it reads and an example);
``deepflow --help`` lists them and ``deepflow COMMAND --help`` documents one.

eval, explain, sample and export read a run's checkpoint: ``--checkpoint best`` (the default: the
run's result, i.e. early stopping's best checkpoint if it kept one, else the latest), ``latest``
or a step number.

A user error (bad config, missing dataset, non-finite loss, mismatched checkpoint) exits
non-zero with one line on stderr; ``--debug`` shows the traceback and runs the steps without jit
and with NaN checks, to step through them.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from typing import Callable

from absl import app, flags

from deepflow.train import DEFAULT_CHECKPOINT  # the light part of deepflow.train

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Experiment file (train).")
flags.DEFINE_string("workdir", None, "Run directory: config.json, metrics.jsonl, checkpoints/.")
flags.DEFINE_string("split", None, "Split to evaluate (eval; default: the config's eval_split).")
flags.DEFINE_string("checkpoint", DEFAULT_CHECKPOINT, "eval, explain, sample, export: the run's "
                    "checkpoint to read: best (the run's result: early stopping's best, else "
                    "the latest), latest, or a step number.")
flags.DEFINE_bool("debug", False, "No jit, NaN checks, full tracebacks.")
flags.DEFINE_bool("distributed", False, "Join a multi-host run (jax.distributed.initialize; "
                  "auto-detected on Cloud TPU unless the three flags below are given).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def _fail(message: str, code: int = 1) -> None:
  print(f"deepflow: error: {message}", file=sys.stderr)
  sys.exit(code)


def _setup_logging(debug: bool) -> None:
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO if debug else absl_logging.WARNING)
  logger = logging.getLogger("deepflow")
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("deepflow: %(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def _require(name: str) -> str:
  value = getattr(FLAGS, name)
  if not value:
    _fail(f"--{name} is required for this command", 2)
  return value


# Each command is a function of the ``--config.KEY=VALUE`` overrides (and of the words after its
# name, if it takes any), registered under its name by ``command``, in the order --help lists
# them; its flags are the absl flags defined above, next to it (``--workdir``, ``--split``,
# ``--checkpoint`` and ``--debug`` shared).
COMMANDS: dict[str, Callable[..., None]] = {}


def command(name: str, *flag_names: str, example: str, args: str = "", config: bool = True):
  """Registers a command function as ``deepflow NAME``, with the flags it reads, the words it
  takes after its name (``args``, e.g. 'prepare NAME'; none by default), whether it takes
  ``--config`` overrides and a typical call, for its --help."""
  def mark(fn):
    fn.flag_names, fn.example, fn.args, fn.config = flag_names, example, args, config
    COMMANDS[name] = fn
    return fn
  return mark


def main(argv: list[str], overrides: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    _fail(f"usage: deepflow {{{','.join(COMMANDS)}}} [flags]; see `deepflow --help`", 2)
  if len(argv) > 2 and not COMMANDS[argv[1]].args:
    _fail(f"unexpected arguments: {' '.join(argv[2:])}", 2)
  if overrides and not COMMANDS[argv[1]].config:
    _fail(f"deepflow {argv[1]} takes no --config overrides", 2)
  from deepflow import platforms
  platforms.skip_absent_tpu()  # before JAX starts a backend: no libtpu where there is no TPU
  _setup_logging(FLAGS.debug)
  from deepflow.registry import ConfigError
  from deepflow.train.errors import NonFiniteLossError, Preempted, WorkdirLockedError
  try:
    if FLAGS.distributed or FLAGS.coordinator_address:
      from deepflow import parallel
      parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                      FLAGS.process_id)
    COMMANDS[argv[1]](overrides, *argv[2:])
  except Preempted as e:
    print(f"deepflow: {e}", file=sys.stderr)
    sys.exit(130 if e.interrupted else 0)
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (compiling, evaluating, ...)
    if FLAGS.debug:
      raise
    print("deepflow: interrupted; checkpoints already saved are intact", file=sys.stderr)
    sys.exit(130)
  except (ConfigError, NonFiniteLossError, FileNotFoundError, WorkdirLockedError) as e:
    if FLAGS.debug:  # user errors: one line
      raise
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  except Exception as e:  # noqa: BLE001  (an out-of-memory that passed the fit check: one line)
    if FLAGS.debug or not _out_of_memory(e):
      raise
    _fail(f"out of memory while running ({str(e).splitlines()[0]}); checkpoints already saved "
          f"are intact; `deepflow plan` shows what each step needs per device: try a smaller "
          f"--config.data.batch_size or the memory-saving options it lists")


def _out_of_memory(e: Exception) -> bool:
  """A JAX runtime error for memory a device did not have (XLA's RESOURCE_EXHAUSTED)."""
  import jax
  return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def _with_debug(fn):
  """Runs ``fn`` eagerly with NaN checks under --debug, jitted otherwise: the one place --debug
  acts (``jax.disable_jit`` makes every jitted step below run as plain Python)."""
  import jax
  if not FLAGS.debug:
    return fn()
  jax.config.update("jax_debug_nans", True)
  with jax.disable_jit():
    return fn()


def _run_source(overrides: list[str]):
  """The run (--workdir), its config ``overrides`` and --checkpoint, as every command reading a
  finished run takes them."""
  from deepflow.train.experiment import RunSource
  return RunSource(_require("workdir"), tuple(overrides), FLAGS.checkpoint)


@command("train", "config", "workdir", example="deepflow train --config experiments/digits_cnn.py "
         "--workdir runs/digits_cnn --config.train.steps=500")
def _train(overrides: list[str]) -> None:
  """Train an experiment, or resume it: rerun the same command on the same workdir.

  Ctrl-C saves a checkpoint at the current step and exits 130 (a second Ctrl-C aborts at once);
  SIGTERM saves and exits 0. One run per workdir: a second one on it is refused."""
  import deepflow
  config = deepflow.load_config(_require("config"), overrides)
  workdir = _require("workdir")
  metrics = _with_debug(lambda: deepflow.train_and_evaluate(config, workdir))
  _print_metrics(config.data.eval_split, metrics)


@command("eval", "workdir", "split", "checkpoint", "quantize",
         example="deepflow eval --workdir runs/digits_cnn --split train")
def _eval(overrides: list[str]) -> None:
  """Evaluate a checkpoint of a run on a split (default: the config's eval_split).

  With --quantize int8 (or int4): that model's metrics too (qwix, deepflow.quantize), on the same
  examples, on a second line."""
  from deepflow.train.writers import MetricWriter
  source = _run_source(overrides)
  exp, state, step, _ = source.open()
  split = FLAGS.split or exp.config.data.eval_split
  metrics = _with_debug(lambda: exp.evaluate(state, split))
  writer = MetricWriter(source.workdir, tensorboard=False)
  writer.write(step, split, metrics)
  _print_metrics(split, metrics, step)
  if FLAGS.quantize:
    from deepflow import qat, quantize
    scheme = qat.export_scheme(exp.config, FLAGS.quantize)  # refuses a contradiction
    quantized = _with_debug(lambda: quantize.evaluate(exp, state, split, scheme))
    _print_metrics(f"{split} {scheme}", quantized, step)


def _print_metrics(split: str, metrics: dict, step: int | None = None) -> None:
  import jax
  if jax.process_index() != 0:  # one report per run, not one per host
    return
  at = "" if step is None else f" at step {step}"
  print(f"final {split} metrics{at}: " +
        " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


flags.DEFINE_multi_string("sweep", [], "sweep: KEY=V1,V2,... (grid values) or "
                          "KEY=loguniform(A,B) / uniform(A,B) / randint(A,B) (random search); "
                          "in a study also KEY=choice(V1,...) and KEY=...@OTHER=VALUE (only "
                          "where the swept OTHER took VALUE).")
flags.DEFINE_integer("trials", 0, "sweep: random search with this many trials (0 = full grid); "
                     "in a study, its trials over all workers.")
flags.DEFINE_integer("sweep_seed", 0, "sweep: seed of the random search's draws.")
flags.DEFINE_bool("vectorize", False, "sweep: train all trials as one vmapped population (numeric "
                  "hyperparameters that change no shape: learning rate, weight decay, dropout, "
                  "seed, ...).")
flags.DEFINE_string("metric", None, "sweep: eval metric to rank by (default accuracy, else rmse, "
                    "else loss).")
flags.DEFINE_enum("mode", None, ["min", "max"], "sweep: whether a lower or higher metric is "
                  "better (default: max for accuracy/auc/f1/precision/recall).")
flags.DEFINE_string("search", "grid", "sweep: grid, random, or an Optuna sampler that learns "
                    "from the trials so far: tpe, cmaes, gp (needs deepflow[search]).")
flags.DEFINE_string("prune", "none", "sweep: stop poor trials at their evaluations with Optuna's "
                    "median, asha or hyperband pruner.")
flags.DEFINE_string("study", None, "sweep: the Optuna study's name; every worker started with "
                    "it (and --storage) pulls trials from the one study (default 'sweep').")
flags.DEFINE_string("storage", None, "sweep: the study's storage, sqlite:///FILE or "
                    "postgresql://USER:PASSWORD@HOST/DB (default: WORKDIR/study.db).")
flags.DEFINE_bool("report", False, "sweep: print the best trials of a running or finished "
                  "study (--study, --storage or --workdir) and exit.")
flags.DEFINE_integer("population", 8, "sweep: with --vectorize and a study, trials per round "
                     "(asked of the sampler, trained as one population, told back).")
flags.DEFINE_integer("heartbeat", 60, "sweep: seconds between a study worker's heartbeats; a "
                     "trial silent for twice that is retried by another worker.")


@command("sweep", "config", "workdir", "sweep", "trials", "sweep_seed", "vectorize", "metric",
         "mode", "search", "prune", "study", "storage", "report", "population", "heartbeat",
         example="deepflow sweep --config experiments/digits_mlp.py --workdir runs/sweep "
         "--sweep optimizer.learning_rate=1e-3,3e-3 --sweep model.activation=relu,tanh")
def _sweep(overrides: list[str]) -> None:
  """Grid or random search, one sub-workdir per trial; writes results.csv, .md and .png.

  --search tpe|cmaes|gp, --prune or --study/--storage make it an Optuna study that any number
  of workers (this command, started on each machine) share; --report prints its best trials."""
  from deepflow import sweep
  if FLAGS.report:
    print(sweep.study_summary(FLAGS.workdir, FLAGS.storage, FLAGS.study))
    return
  if not FLAGS.sweep:
    _fail("--sweep KEY=V1,V2,... is required for this command", 2)
  study = sweep.needs_study(FLAGS.search, FLAGS.prune, FLAGS.study, FLAGS.storage)
  if study:
    shared = FLAGS.study or FLAGS.storage  # many workers: each draws its own points
    rows = sweep.run_study(
        _require("config"), _require("workdir"), [sweep.parse_param(s) for s in FLAGS.sweep],
        overrides=overrides, search=FLAGS.search, prune=FLAGS.prune, storage=FLAGS.storage,
        study=FLAGS.study or sweep.STUDY, trials=FLAGS.trials,
        seed=sweep.worker_seed(FLAGS.sweep_seed) if shared else FLAGS.sweep_seed,
        metric=FLAGS.metric, mode=FLAGS.mode,
        population=FLAGS.population if FLAGS.vectorize else 0, heartbeat=FLAGS.heartbeat)
  else:
    rows = sweep.run_sweep(_require("config"), _require("workdir"),
                           [sweep.parse_axis(s) for s in FLAGS.sweep], overrides=overrides,
                           trials=FLAGS.trials, seed=FLAGS.sweep_seed, vectorize=FLAGS.vectorize,
                           metric=FLAGS.metric, mode=FLAGS.mode)
  if rows:
    with open(os.path.join(FLAGS.workdir, "results.md")) as f:
      print(f.read().rstrip())
  plots = " and the study's history, parallel-coordinate and importance plots" if study else ""
  print(f"{len(rows)} trials; results.csv, results.md, results.png{plots} in {FLAGS.workdir}")


flags.DEFINE_string("out", None, "export: directory to write the inference artifact to.")
flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "export: platforms the artifact is "
                  "lowered for.")
flags.DEFINE_enum("format", "stablehlo", ["stablehlo", "safetensors", "hf", "onnx"], "export: "
                  "'stablehlo' (an inference artifact for `deepflow predict`), 'safetensors' (the "
                  "weights under flat names, LoRA merged; --out FILE.safetensors or a directory), "
                  "'hf' (a Hugging Face checkpoint directory that transformers loads) or 'onnx' "
                  "(DIR/model.onnx for ONNX Runtime; `deepflow predict` runs it without JAX; needs "
                  "deepflow[edge]).")
flags.DEFINE_enum("quantize", None, ["int8", "int4"], "export: int8 (or int4) weights, int8 "
                  "activations quantized at run time (qwix for stablehlo; ONNX Runtime's int8 for "
                  "onnx); eval: also report the metrics of that model (qwix) beside the float "
                  "ones. A run trained with model.quantization exports quantized without it.")
flags.DEFINE_string("model", None, "predict: an artifact directory written by `deepflow export`.")
flags.DEFINE_string("input", None, "predict: examples as .npy or .json (a batch, or one example).")
flags.DEFINE_string("output", None, "predict: write to .npy (the model's outputs: logits for a "
                    "classifier) or .json (records); default: one JSON line per example.")


@command("export", "workdir", "out", "format", "quantize", "platforms", "checkpoint",
         example="deepflow export --workdir runs/digits_cnn --out artifacts/digits_cnn")
def _export(overrides: list[str]) -> None:
  """Write a run's inference artifact (StableHLO, weights, preprocessing, signature.json).

  With --format safetensors: its weights only, as named tensors (LoRA adapters merged), which
  model.init_from and the safetensors library read. With --format hf: a Hugging Face checkpoint
  (config.json, safetensors, the run's tokenizer files) for transformers and load_pretrained.
  With --format onnx: DIR/model.onnx and signature.json. --quantize int8: the int8 model, as
  stablehlo or onnx (int4: stablehlo); a run trained with model.quantization is exported so by
  default."""
  out = _require("out")
  if FLAGS.quantize and FLAGS.format in ("safetensors", "hf"):
    _fail(f"--quantize writes an inference artifact (--format stablehlo or onnx), not "
          f"{FLAGS.format}", 2)
  from deepflow import export
  source = _run_source(overrides)
  if FLAGS.format == "hf":
    from deepflow.hf import export as hf_export
    written, step = hf_export.export_run(source, out)
    print(f"exported step {step} of {FLAGS.workdir} as a Hugging Face checkpoint to {out}: "
          f"{', '.join(written)}")
    return
  if FLAGS.format == "onnx":
    from deepflow import export_onnx
    signature = export_onnx.export_onnx(source, out, quantize=FLAGS.quantize)
    path = os.path.join(out, export_onnx.ONNX_FILE)
    print(f"exported step {signature['source']['step']} of {FLAGS.workdir} to {path} "
          f"({os.path.getsize(path) / 1024:.0f} KiB"
          f"{', int8' if 'quantization' in signature else ''}); input "
          f"{signature['input']['shape']}")
    return
  if FLAGS.format == "safetensors":
    path, tensors, step = export.export_safetensors(source, out)
    print(f"exported the weights of step {step} of {FLAGS.workdir} to {path}: {len(tensors)} "
          f"tensors, {os.path.getsize(path) / 1024:.0f} KiB")
    return
  signature = export.export(source, out, platforms=FLAGS.platforms, quantize=FLAGS.quantize)
  source, spec = signature["source"], signature["input"]
  sizes = ", ".join(f"{name} {os.path.getsize(os.path.join(out, name)) / 1024:.0f} KiB"
                    for name in (export.MODEL_FILE, export.WEIGHTS_FILE))
  shape = ", ".join("batch" if d is None else str(d) for d in spec["shape"])
  print(f"exported step {source['step']} ({source['checkpoint']} checkpoint) of {FLAGS.workdir} "
        f"to {out}: {sizes}; input ({shape}) {spec['dtype']}; "
        f"platforms {', '.join(signature['platforms'])}"
        f"{'; ' + signature['quantization']['scheme'] if 'quantization' in signature else ''}")


@command("predict", "model", "input", "output", config=False,
         example="deepflow predict --model artifacts/digits_cnn --input examples.npy")
def _predict(overrides: list[str]) -> None:
  """Run an exported artifact on .npy/.json examples (needs no experiment file)."""
  import json
  from deepflow import predict as predict_lib
  predictor = predict_lib.load(_require("model"))
  outputs = predictor(predict_lib.read_inputs(_require("input")))
  if FLAGS.output:
    predict_lib.write_predictions(FLAGS.output, predictor, outputs)
    print(f"wrote {len(outputs)} predictions to {FLAGS.output}")
  else:
    for record in predictor.records(outputs):
      print(json.dumps(record))


flags.DEFINE_string("method", "integrated_gradients", "explain: attribution method "
                    "(saliency, gradient_x_input, integrated_gradients, smoothgrad, occlusion).")
flags.DEFINE_integer("num_examples", 16, "explain: how many examples of the split to attribute.")
flags.DEFINE_alias("num-examples", "num_examples")
flags.DEFINE_enum("target", "predicted", ["predicted", "label"], "explain: attribute the model's "
                  "predicted class or the true label.")
flags.DEFINE_multi_string("option", [], "explain: a method option KEY=VALUE (e.g. steps=100, "
                          "baseline=mean, patch=2).")


@command("explain", "workdir", "checkpoint", "method", "num_examples", "split", "target", "option",
         example="deepflow explain --workdir runs/digits_cnn --method saliency")
def _explain(overrides: list[str]) -> None:
  """Feature attributions of a run's checkpoint: DIR/explain/METHOD.png and .npz."""
  from deepflow import explain
  result = _with_debug(lambda: explain.explain(
      _run_source(overrides), FLAGS.method, FLAGS.num_examples, split=FLAGS.split,
      target=FLAGS.target, options=explain.parse_options(FLAGS.option)))
  print(f"{result.method} attributions of {len(result.inputs)} {result.split} examples at step "
        f"{result.step}: {result.png} {result.npz}")


flags.DEFINE_integer("num", 4, "sample: how many samples to draw.")
flags.DEFINE_string("prompt", None, "sample: text a language model continues (default: its "
                    "vocabulary's first token).")
flags.DEFINE_integer("num_tokens", None, "sample: tokens a language model adds (default 200, or "
                     "what its max_len leaves).")
flags.DEFINE_float("temperature", None, "sample: softmax temperature (0 = greedy; default 1).")
flags.DEFINE_integer("top_k", None, "sample: draw among the k most likely tokens (default all).")
flags.DEFINE_integer("sample_seed", 0, "sample: seed of the draws.")


@command("sample", "workdir", "checkpoint", "num", "prompt", "num_tokens", "temperature", "top_k",
         "sample_seed",
         example="deepflow sample --workdir runs/text_transformer --prompt 'The ' --num 2")
def _sample(overrides: list[str]) -> None:
  """Draw from a trained generative model: text (language models), PNG grids (GANs)."""
  from deepflow import sample
  samples, files, step = _with_debug(lambda: sample.sample_run(
      _run_source(overrides), FLAGS.num, seed=FLAGS.sample_seed, prompt=FLAGS.prompt,
      num_tokens=FLAGS.num_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k))
  for i, text in enumerate(samples.get("text", ())):
    print(f"--- sample {i + 1} ---\n{text}")
  print(f"{FLAGS.num} samples from the checkpoint at step {step}: {', '.join(files)}")


flags.DEFINE_string("topology", None, "plan: a TPU slice to compile for, e.g. v5e:2x2, "
                    "v5e:4x8, v4:2x2x1, v5p:2x2x1, v6e:4x4 (needs deepflow[tpu]); default: the "
                    "local devices.")
flags.DEFINE_bool("json", False, "plan: print the plan as JSON.")
flags.DEFINE_integer("measure", 0, "plan: also run this many real train steps on the local "
                     "devices and report their measured peak memory.")
flags.DEFINE_bool("search_batch", True, "plan: find the largest global batch that fits by "
                  "compiling (a few more compiles).")
flags.DEFINE_bool("remat_policies", False, "plan: also compile the train step under each remat "
                  "policy (none, full, dots_saveable, nothing_saveable) and show the memory "
                  "each saves.")


@command("plan", "config", "topology", "json", "measure", "search_batch", "remat_policies",
         example="deepflow plan --config experiments/gpt2_small.py --topology v5e:2x4")
def _plan(overrides: list[str]) -> None:
  """Plan a run: memory per device, FLOPs, step time and sharding on a TPU slice or here.

  Compiles the train and eval steps for a TPU topology (or the local devices) from abstract
  shapes, and says whether the run fits and the largest global batch that does (exit 1 if it
  does not fit)."""
  import json
  import deepflow
  from deepflow import plan as plan_lib
  if FLAGS.measure and FLAGS.topology:
    _fail("--measure runs steps on the local devices; it cannot be combined with --topology", 2)
  devices = plan_lib.target_devices(FLAGS.topology)
  config = deepflow.load_config(_require("config"), overrides, num_devices=len(devices))
  plan = plan_lib.make_plan(config, FLAGS.topology, search_batch=FLAGS.search_batch,
                            remat_policies=FLAGS.remat_policies)
  if FLAGS.measure:
    plan["measured"] = {"steps": FLAGS.measure, **plan_lib.measure(config, FLAGS.measure)}
  print(json.dumps(plan, indent=1) if FLAGS.json else plan_lib.format_plan(plan))
  if plan["fits"] is False:
    sys.exit(1)


flags.DEFINE_string("data_dir", None, "data prepare: the TFDS data directory to write (default: "
                    "$TFDS_DATA_DIR, else ~/tensorflow_datasets); data.data_dir when training.")
flags.DEFINE_string("manual_dir", None, "data prepare: files downloaded by hand, for datasets "
                    "that need them (imagenet2012: ILSVRC2012_img_train.tar and _val.tar).")
flags.DEFINE_list("imports", [], "data prepare: modules to import first, which register TFDS "
                  "builders of one's own.")


@command("data", "data_dir", "manual_dir", "imports", args="prepare NAME[/CONFIG][:VERSION]",
         config=False,
         example="deepflow data prepare cifar10 --data_dir /data/tfds")
def _data(overrides: list[str], *args: str) -> None:
  """Prepare a TFDS dataset as ArrayRecord, where there is network (training never needs it).

  Downloads and writes it once (TFDS builds some datasets with TensorFlow: install it for this
  step); then train with --config.data.source=tfds:NAME --config.data.data_dir=DIR."""
  from deepflow.data import prepare, sources
  if len(args) != 2 or args[0] != "prepare":
    _fail(f"usage: deepflow data {_data.args} [flags]; see `deepflow data --help`", 2)
  data_dir = FLAGS.data_dir or sources.default_data_dir()
  builder, now = prepare.prepare(args[1], data_dir, manual_dir=FLAGS.manual_dir,
                                 imports=FLAGS.imports)
  print(prepare.report(builder, args[1], data_dir, now))


def run(argv: list[str] | None = None) -> None:
  """Console-script entry point: splits off ``--config.KEY=VALUE`` overrides, then absl."""
  argv = list(sys.argv if argv is None else argv)
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  if any(a in HELP_FLAGS for a in rest[1:]):
    print(usage(next((a for a in rest[1:] if a in COMMANDS), None)))
    return
  app.run(functools.partial(main, overrides=overrides), argv=rest)


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")
SHARED_FLAGS = ("debug", "distributed", "coordinator_address", "num_processes", "process_id")


def usage(name: str | None = None) -> str:
  """``deepflow --help`` (every command, one line each) or ``deepflow NAME --help`` (that
  command's description, its flags with their defaults, and an example)."""
  if name is None:
    width = max(map(len, COMMANDS))
    lines = ["usage: deepflow COMMAND [flags] [--config.KEY=VALUE ...]", "", "commands:"]
    lines += [f"  {n:<{width}}  {_summary(fn)}" for n, fn in COMMANDS.items()]
    lines += ["", "`deepflow COMMAND --help` shows a command's flags and an example; "
              "`deepflow --helpfull` lists every flag."]
    return "\n".join(lines)
  fn = COMMANDS[name]
  doc = inspect.cleandoc(fn.__doc__ or "").splitlines()
  words = f" {fn.args}" if fn.args else ""
  config = " [--config.KEY=VALUE ...]" if fn.config else ""
  lines = [f"usage: deepflow {name}{words} [flags]{config}", ""] + doc + [
      "", "flags:"]
  for flag in (*fn.flag_names, *SHARED_FLAGS):
    f = FLAGS[flag]
    unset = f.default is None or f.default is False or f.default in ([], "")
    default = "" if unset else f" (default: {f.default_as_str})"
    lines.append(f"  --{flag}: {f.help}{default}")
  lines += ["", "example:", f"  {fn.example}"]
  return "\n".join(lines)


def _summary(fn) -> str:
  return (fn.__doc__ or "").strip().splitlines()[0]
