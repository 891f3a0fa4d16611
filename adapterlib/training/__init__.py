"""Floor 5, training: the config and presets (`config`), the checks of what a run is measured with (`evalspec`),
the seam to the Shapes world (`worlds`), the encoding cache (`cache`) and a step's inputs read from it or from the
images (`batches`), losses and schedules (`losses`), checkpoints (`checkpoint`), one writer (`lock`), progress lines
(`progress`), several processes (`distributed`), what a run's memory is made of (`memory`), one optimisation step
(`step`), a run's checkpoints as the loop writes them (`saver`) and the loop itself (`train`)."""
