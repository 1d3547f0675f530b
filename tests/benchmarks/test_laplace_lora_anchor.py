"""The laplace-torch anchor on dict (tokenised text) batches, the Laplace-LoRA baseline of the text leaderboard:
the dict path must hand laplace-torch exactly the data and network of the tensor path, and the one-example-per-call
GLM predictive must equal laplace-torch's batched one."""

from __future__ import annotations

import torch
from leaderboard_anchors import HFStyleBatches, HFStyleNetwork, glm_probabilities
from tiny_lora_llama import VOCAB, perturb_lora_b, tiny_lora_llama
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

LENGTH, EXAMPLES = 6, 12


class AnswerScores(nn.Module):
    """Next-token logits of the last position at two answer tokens (the CausalLMAnswerClassifier's form)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_lora_llama(seed=0)
        perturb_lora_b(self.model)

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits[:, -1, :2]


class TokenTensorNetwork(nn.Module):
    """The same network on a plain ``input_ids`` tensor (laplace-torch's tensor path)."""

    def __init__(self, network: AnswerScores) -> None:
        super().__init__()
        self.network = network

    def forward(self, ids: Tensor) -> Tensor:
        return self.network({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


class Tokens(Dataset):
    def __init__(self, as_dict: bool) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (EXAMPLES, LENGTH), generator=generator)
        self.y = torch.randint(0, 2, (EXAMPLES,), generator=generator)
        self.as_dict = as_dict

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, n: int) -> tuple[object, Tensor]:
        ids = self.ids[n]
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if self.as_dict else ids
        return x, self.y[n]


def _fitted(network: nn.Module, loader: object) -> object:
    from laplace import Laplace

    la = Laplace(network, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit(loader)
    la.prior_precision = 3.0
    return la


def test_dict_batches_give_laplace_torch_the_data_and_network_of_the_tensor_path() -> None:
    scores = AnswerScores().eval()
    by_dict = _fitted(
        HFStyleNetwork(scores), HFStyleBatches(DataLoader(Tokens(True), batch_size=5), torch.device("cpu"))
    )
    by_tensor = _fitted(TokenTensorNetwork(scores), DataLoader(Tokens(False), batch_size=5))
    assert by_dict.n_params == by_tensor.n_params == sum(p.numel() for n, p in scores.named_parameters() if "lora" in n)
    assert by_dict.n_data == by_tensor.n_data == EXAMPLES
    torch.testing.assert_close(by_dict.loss, by_tensor.loss, rtol=1e-10, atol=0)
    precision = by_tensor.posterior_precision.to_matrix()
    torch.testing.assert_close(by_dict.posterior_precision.to_matrix(), precision, rtol=1e-10, atol=1e-10)
    assert (precision - 3.0 * torch.eye(len(precision), dtype=precision.dtype)).abs().max() > 1e-3  # data counted
    ids = Tokens(False).ids[:4]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    one_by_one = glm_probabilities(by_dict, batch)
    batched = by_tensor(ids, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(one_by_one, batched, rtol=1e-10, atol=1e-12)
    map_probs = torch.softmax(scores(batch), -1)
    assert (one_by_one - map_probs).abs().max() > 1e-4, "the posterior must move the predictive off the MAP's"
