"""mtl's Hydra plugins. Hydra instantiates sweepers and launchers only from classes defined in the hydra_plugins
namespace package, which it scans at start-up, so the classes are named here and written in mtl_cli (sweeper.py,
launchers.py). Each is defined only when its plugin is installed (pip install "mtl-cli[sweep]")."""


def register() -> None:
    """Registers the plugins with Hydra for a sweep. Hydra finds plugins by walking the folders of hydra_plugins,
    and an editable install (pip install -e .) adds this one through an import hook, not a folder."""
    from hydra.core.plugins import Plugins

    from . import slurm_launcher, study_sweeper

    for module in (study_sweeper, slurm_launcher):
        for plugin in vars(module).values():
            if isinstance(plugin, type) and plugin.__module__ == module.__name__:
                Plugins.instance().register(plugin)
