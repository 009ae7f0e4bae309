"""Builds the networks from a ModelConfig (shared by pretraining, fine-tuning and export)."""
from micle_tf.models.heads import ProjectionHead
from micle_tf.models.resnet import build_resnet


def build_encoder(model_cfg, fine_tune_after_block=-1):
    return build_resnet(model_cfg.depth, width_multiplier=model_cfg.width_multiplier,
                        sk_ratio=model_cfg.sk_ratio, image_size=model_cfg.image_size,
                        synchronized_bn=model_cfg.synchronized_bn,
                        bn_momentum=model_cfg.bn_momentum,
                        fine_tune_after_block=fine_tune_after_block, name="encoder")


def build_projection_head(model_cfg):
    return ProjectionHead(num_proj_layers=model_cfg.num_proj_layers,
                          proj_out_dim=model_cfg.proj_out_dim,
                          hidden_dim=model_cfg.proj_hidden_dim,
                          synchronized_bn=model_cfg.synchronized_bn,
                          bn_momentum=model_cfg.bn_momentum, name="projection_head")
