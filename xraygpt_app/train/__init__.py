"""Fine-tuning: ``xraygpt finetune``, the :class:`~xraygpt_app.train.trainer.Trainer` API, data and objectives.

Modules: ``data`` (read and check pairs, split, image transforms), ``config`` (the ``train:``
section), ``base`` (the base every trainable model derives from), ``xraygpt_objective`` (XrayGPT's
``MiniGPT4.forward`` on our model), ``llava_objective`` (the llava family: the projector, then the
projector + LoRA), ``lora`` (peft adapters), ``schedule`` (XrayGPT's learning-rate schedule),
``trainer`` (the ``accelerate`` loop), ``outputs`` (checkpoints, metrics, charts).

The loop is family-agnostic: it knows a model only as a
:class:`~xraygpt_app.train.family.TrainableFamily` (``family.py``), the base that says how rows
become batches (``read_data``, ``dataset``, ``collate``, ``step_inputs``), what ``forward`` returns
(``(loss, count)``), what trains under which released names (``named_trainable``), the checkpoint
entry and resume (``checkpoint_state`` / ``load_checkpoint_state``, ``adapter_state``), what is
written beside each epoch's checkpoint (``save_epoch``) and the end-of-run evaluation
(``end_of_run``). :class:`~xraygpt_app.train.family.ChatTrainable` holds what the chat families
share: one instruction per batch, the ``before + image tokens + after + target`` layout with
``IGNORE_INDEX`` labels, the causal-LM loss, LoRA adapters in peft's format and the greedy report
helper. A family gives only its prompt (``row_ids``) and what trains; the image tokens come from the chat
model's own ``image_tokens``.

The trainer picks the class by ``model.family`` from the family registry (``families/registry.py``, ``trainable``).
With ``train.model`` (``finetune --model NAME``) it fine-tunes that zero-shot model of
``zeroshot.models`` instead (``trainer.ZEROSHOT_TRAINABLES`` by kind: ``zeroshot_objectives`` for
MedCLIP's and open_clip's losses, ``medklip_objective`` for MedKLIP's; docs/fine-tuning-zeroshot.md).
"""
