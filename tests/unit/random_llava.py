"""A small random llava-hf LLaVA with a DINOv2 tower (transformers 5 names), a GQA LLaMA decoder and tied
embeddings, shared by the structure tests (linear order, fold, rotate). Norm gains (and biases) are drawn away from
1 (and 0), as in a trained model, so that folding them is not a no-op."""
import torch
from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 99


def dinov2_llava(seed: int = 0):
    """(model in eval mode, a batch of model inputs: 2 rows, 4 image tokens, pixel_values 28 x 28)."""
    torch.manual_seed(seed)
    vc = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      image_size=28, patch_size=14)
    tc = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                     num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                                                      vision_feature_layer=-1, image_seq_length=4)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
            m.weight.data.uniform_(0.5, 2.0)
            if getattr(m, "bias", None) is not None:
                m.bias.data.normal_(0, 0.1)
    batch = dict(input_ids=torch.tensor([[1] + [IMAGE_TOKEN] * 4 + [5, 6, 7]] * 2),
                 pixel_values=torch.randn(2, 3, 28, 28))
    return model, batch
