"""Fine-tuning: ``xraygpt finetune``, the :class:`~xraygpt_app.train.trainer.Trainer` API, data and objectives.

Modules: ``data`` (read and check pairs, split, image transforms), ``config`` (the ``train:``
section), ``family`` (what a model family gives the trainer), ``xraygpt_objective`` (XrayGPT's
``MiniGPT4.forward`` on our model), ``llava_objective`` (the llava family: the projector, then the
projector + LoRA), ``lora`` (peft adapters), ``schedule`` (XrayGPT's learning-rate schedule),
``trainer`` (the ``accelerate`` loop), ``outputs`` (checkpoints, metrics, charts).

The loop is family-agnostic. A model family (``model.family``: xraygpt or llava) is an ``nn.Module``
that implements :class:`~xraygpt_app.train.family.TrainableFamily`:

- ``forward(pixel_values, instructions, targets) -> (loss, target_tokens)``, built on
  ``training_batch(...) -> TrainingBatch(inputs_embeds, attention_mask, labels)``: the family
  wraps each instruction (or a VQA row's question) in its own prompt template;
- ``image_transform(augment)``: the family's training transform, or its deterministic eval one;
- ``instructions``: the list drawn from (one per batch, seeded) for rows without a question;
- ``named_trainable()``: trainable parameters under the family's checkpoint names (the
  optimizer's weight-decay rule reads those names);
- ``checkpoint_state()`` / ``load_checkpoint_state(state, lora)``: the ``'model'`` entry of the
  family's native checkpoint, and back; ``adapter_state()`` / ``save_adapter(folder)`` for LoRA
  in peft's format;
- ``generate_report(image, max_new_tokens)``: a greedy report for the end-of-run metrics;
- ``train(mode)`` keeps frozen parts in eval mode.

The trainer registers families by name in ``trainer.FAMILIES`` (a loader ``(Config, TrainConfig) ->
family``).
"""
