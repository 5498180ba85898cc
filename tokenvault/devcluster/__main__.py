"""`python -m tokenvault.devcluster COMMAND`: what ./run_cluster.sh runs."""

from tokenvault.devcluster.cluster_cli import main

main()
