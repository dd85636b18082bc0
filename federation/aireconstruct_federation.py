"""The Flower App of AIReconstruct's federated training, for ``flwr run`` against a real SuperLink:
the ServerApp reads its settings from pyproject.toml's run config, and each site's ClientApp trains
on the data set folder its SuperNode names with ``--node-config 'data-folder="/path"'``."""

from AIReconstructLib.federated import deployment_server_app
from AIReconstructLib.federated_site import client_app

server = deployment_server_app()
client = client_app()
