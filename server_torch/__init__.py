"""The server side of spliteasy: slice B trained in PyTorch behind FastAPI.

- ``app.create_app(bundle_dir, ...)``: the HTTP app (docs/protocol.md, v1)
- ``sessions.SplitService``: sessions, turn-taking on B, retry store (transport-free)
- ``trainer.Trainer``: B, its Keras-exact optimizer and loss, numpy in and out
- ``serving``: uvicorn in the foreground, in a thread, or as a ``spliteasy serve`` child
- ``keras_compat``: Keras-exact BatchNorm and optimizers in torch

Nothing heavy is imported here, so ``import server_torch.serving`` stays cheap.
"""
