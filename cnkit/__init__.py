"""cnkit: a kit for understanding and reproducing ControlNet (Zhang, Rao, Agrawala, ICCV 2023).

The map, bottom-up. Each module holds one idea and imports only modules of its own layer or below, so the
package reads from the top of this list down and has no import cycle (``tests/test_layout.py`` checks both). A
subpackage's modules are on the map by dotted name (``architectures.base``).

- 0 foundations: ``params`` (notebook parameters), ``pixels`` (pixel conventions), ``card`` (model cards),
  ``checkpoints`` (crash-safe run folders), ``summary`` (summary.json), ``viz`` (plots from numbers)
- 1 data: ``toyworld`` (worlds with exact truth), ``datasets`` (Fill50K, imagefolder and HF readers),
  ``splits`` (what is held out, and which seeds each measurement uses)
- 2 models: ``tokenizer``, ``tiny`` (the embedded base's parts), ``sd15`` (a random base of SD 1.5's exact
  shape, for testing the real path on a CPU), ``bases`` (loading any base), ``controlnets``
  (ControlNet variants, building and loading them), ``export`` (the original single-file layout the WebUI and
  ComfyUI load, both ways), ``architectures`` (a subpackage: ControlNet and its successors, ControlNet-XS,
  T2I-Adapter, ControlNeXt, a multi-condition net, built from any base behind one interface)
- 3 measures: ``metrics``: pure functions of images, masks and curves (numpy); no model, no generation
- 4 generation: ``weighting`` (control modes, CFG weighting), ``annotators``, ``adapter_pipeline`` (diffusers'
  text-to-image pipeline driven by any architecture), ``generate`` (generation from control units; the one image
  loop every measurement uses)
- 5 training: ``encoded`` (the encoded training set on disk, read a batch at a time), ``trainset`` (the training
  set as the trainer reads it: fitted, encoded once or on the fly), ``train`` (the trainer of ControlNet and its
  successors), ``telemetry`` (what watches it: injection points, validation), ``pretrain`` (the base's)
- 6 experiments: ``evaluations`` (drivers that generate images to measure them), ``runs`` (runs kept by
  configuration), ``experiments`` (the notebooks' runs), ``shipped`` (what the kit ships, and its cards),
  ``bench_runs`` (notebook 10's successor runs, shipped finished so that ``make figures`` keeps its budget),
  ``costs`` (an architecture's parameters, file size, step and image times, measured on equal terms),
  ``successor_claims`` (ControlNet's successors' published claims and the verdicts measurements give them)
- 7 surfaces: ``report`` (``make figures``), ``widgets`` (the playground)

Data flows one way: data -> train (with probes attached from outside) -> run folder (config, checkpoint,
telemetry.csv, validation.csv, samples, convergence.json) -> evaluations / viz / report. Notebooks are thin
drivers over these modules and read results back from files.
"""

LAYERS = {
    "params": 0, "pixels": 0, "card": 0, "checkpoints": 0, "summary": 0, "viz": 0,
    "toyworld": 1, "datasets": 1, "splits": 1,
    "tokenizer": 2, "tiny": 2, "sd15": 2, "bases": 2, "controlnets": 2, "export": 2,
    "architectures": 2, "architectures.base": 2, "architectures.controlnet": 2, "architectures.controlnet_xs": 2,
    "architectures.t2i_adapter": 2, "architectures.controlnext": 2,
    "architectures.union": 2, "architectures.control_lora": 2,
    "metrics": 3,
    "weighting": 4, "annotators": 4, "adapter_pipeline": 4, "generate": 4,
    "encoded": 5, "trainset": 5, "train": 5, "telemetry": 5, "pretrain": 5,
    "evaluations": 6, "runs": 6, "experiments": 6, "shipped": 6, "bench_runs": 6, "costs": 6, "successor_claims": 6,
    "report": 7, "widgets": 7,
}
