"""The final model (saved or pushed) as a ``from_pretrained`` folder whatever the strategy's checkpoint format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def loadable_final_save(trainer) -> Iterator[None]:
    """Inside: ``trainer.save_model`` writes a ``from_pretrained`` folder also under FSDP.

    With FSDP's ``SHARDED_STATE_DICT`` (the usual choice: checkpoints save and resume fast),
    transformers' ``save_model`` writes no model at all. The full state dict is switched on for the
    duration only, so checkpoints keep their sharded format.
    """
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        yield
        return
    previous = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
    plugin.state_dict_config = plugin.optim_state_dict_config = None  # so the full type gets its own configs
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = previous


class LoadableFinalSaveMixin:
    """For ``transformers.Trainer`` subclasses: checkpoints (``_internal_call``) as the strategy keeps
    them, the model saved at the end, and the model ``push_to_hub`` uploads, always loadable with
    ``from_pretrained``. Subclasses that add steps to the final save test ``is_final_save``."""

    _pushing = False  # inside push_to_hub

    def is_final_save(self, _internal_call: bool) -> bool:
        """Whether a ``save_model`` call writes the final model (else a checkpoint's)."""
        return not _internal_call or self._pushing

    def push_to_hub(self, *args, **kwargs):
        # transformers' push_to_hub saves with _internal_call=True, the flag of its checkpoint saves, then
        # uploads output_dir: that save is the pushed model, so it must be the final save (full weights under
        # FSDP, DQO's value function apart), or the Hub would get a checkpoint's files.
        self._pushing = True
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._pushing = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_final_save(_internal_call):
            return super().save_model(output_dir, _internal_call)
        with loadable_final_save(self):
            super().save_model(output_dir, _internal_call)
