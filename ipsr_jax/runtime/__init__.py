"""What every entry point runs on: devices, meshes, the console, paths, run folders, checkpoints, summaries."""
