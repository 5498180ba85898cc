"""The local cluster tool behind ./run_cluster.sh (generation, start/stop, the demo); dev only."""
