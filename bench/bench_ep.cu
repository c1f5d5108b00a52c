// flashmoe-bench-ep: expert parallelism on the GPUs of one host, one rank per GPU:
//
//   mpirun -np P flashmoe-bench-ep [--case NAME]... [--reps N]
//
// For each layer case, with T tokens on every rank and the expert tables sharded over
// the P ranks (NCCL), rank 0 prints the medians of CUDA-event timings, each repetition
// started from a barrier:
//   layer fwd (+bwd), 1 GPU:  every rank runs its own unsharded layer, no communication;
//   layer fwd (+bwd), P GPUs: the sharded layer, once with each transport (moe.exchange:
//                             collectives, peer copies); 1 GPU / P GPUs is the layer's
//                             weak-scaling efficiency (the work per GPU is the same);
//   dispatch, combine, dispatch_grad, combine_grad: the layer's four exchanges alone,
//                          over NCCL's collectives;
//   plain all-to-all:      the communicator's all_to_all (grouped ncclSend/ncclRecv) of
//                          the bytes that dispatch sends as token rows, from one buffer.
// An exchange is timed twice: alone after a barrier (which counts the ranks' skew as
// they leave it, as a layer step would) and per call in a run of 10 back to back
// (the transfer's own time). Bandwidth is the bytes a rank sends to other ranks over
// the time in the run.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/flashmoe_layer.h"
#include "parallel/expert_parallel.h"
#include "parallel/mpi_communicator.h"

namespace flashmoe {
namespace {

struct Options {
  std::vector<std::string> cases;
  int reps = 30;
};

Options parse_args(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    FLASHMOE_CHECK(i + 1 < argc, arg << " needs a value, expected --case NAME or --reps N");
    if (arg == "--case") {
      opt.cases.push_back(argv[++i]);
    } else if (arg == "--reps") {
      opt.reps = std::stoi(argv[++i]);
      FLASHMOE_CHECK(opt.reps >= 20, "--reps is " << opt.reps << ", expected >= 20");
    } else {
      FLASHMOE_FAIL("unknown argument " << arg << ", expected --case NAME or --reps N");
    }
  }
  return opt;
}

class EpBench {
 public:
  EpBench(const LayerCase& c, Communicator& comm, int reps)
      : c_(c), comm_(comm), reps_(reps), moe_(moe_config(c)) {
    x_ = random_tensor({c.T, c.D}, DType::bf16, 800 + comm.rank(), 1.0f);
    dy_ = random_tensor({c.T, c.D}, DType::bf16, 900 + comm.rank(), 1.0f);
  }

  void run() {
    for (bool backward : {false, true}) {
      const std::string op = backward ? "layer fwd+bwd" : "layer fwd";
      const double layer_1 = layer_ms(nullptr, backward, ExchangeKind::automatic);
      layer_row((op + ", 1 GPU").c_str(), layer_1);
      if (comm_.size() == 1) continue;
      for (ExchangeKind kind : {ExchangeKind::collectives, ExchangeKind::peer_copies}) {
        const double layer_p = layer_ms(&comm_, backward, kind);
        const std::string name = op + ", P GPUs, " + to_string(kind);
        layer_row(name.c_str(), layer_p);
        if (comm_.rank() == 0) {
          std::printf("| %s | %d | %s weak-scaling efficiency | %.0f%% | | | |\n", c_.name,
                      comm_.size(), name.c_str(), 100.0 * layer_1 / layer_p);
        }
      }
    }
    exchanges();
  }

 private:
  double timed(const std::function<void()>& fn) {
    return time_median_ms([&](int) { fn(); }, reps_, 3, [&] { comm_.barrier(); });
  }

  void exchange_row(const char* op, const std::function<void()>& fn, double bytes_to_peers) {
    constexpr int kRun = 10;
    const double alone = timed(fn), in_run = timed([&] {
                                               for (int i = 0; i < kRun; ++i) fn();
                                             }) /
                                             kRun;
    if (comm_.rank() != 0) return;
    std::printf("| %s | %d | %s | %.4f | %.4f | %.1f | %.0f |\n", c_.name, comm_.size(), op, alone,
                in_run, bytes_to_peers / 1e6, bytes_to_peers / (in_run * 1e-3) / 1e9);
  }

  double layer_ms(Communicator* comm, bool backward, ExchangeKind kind) {
    MoeConfig moe = moe_;
    moe.exchange = kind;
    FlashMoELayer layer(c_.D, moe, Device::cuda, DType::bf16, 1, 0, comm);
    return timed([&] {
      layer.forward(x_, true);
      if (backward) {
        layer.backward(dy_);
        layer.finish_backward();
      }
    });
  }

  void exchanges() {
    const int64_t T = c_.T, S = int64_t(c_.H) * c_.K, P = comm_.size();
    if (P == 1) return;
    // Routing as the router gives it: S distinct-enough ids over the whole table.
    std::vector<int32_t> ids(T * S);
    for (int64_t i = 0; i < T * S; ++i) {
      ids[i] = static_cast<int32_t>(philox_uniform(7, comm_.rank(), i, 0.0f, 1.0f) * c_.E) %
               static_cast<int32_t>(c_.E);
    }
    const Tensor id_tensor = Tensor::from_vector(ids, {T, S}, Device::cuda),
                 gates = random_tensor({T, S}, DType::f32, 5, 1.0f);
    ExpertExchange exchange(comm_, c_.E, S, Device::cuda, ExchangeKind::collectives);
    const auto dispatch = [&]() -> const ExpertRows& {
      exchange.start_dispatch(x_);
      exchange.dispatch(id_tensor, gates);
      for (int peer : exchange.peers()) exchange.receive(peer);
      return exchange.owned();
    };
    const ExpertRows& rows = dispatch();
    const int64_t R = rows.x.size(0);
    const Tensor partial = random_tensor({R, c_.D}, DType::bf16, 6, 1.0f),
                 partial_dgates = random_tensor({R, S}, DType::f32, 7, 1.0f);
    Tensor y, dx, dgates;
    const double row_bytes = double(P - 1) * T * c_.D * 2;
    const double slot_bytes = double(P - 1) * T * S * 8;  // ids and gates
    exchange_row(
        "dispatch (x, ids, gates)", [&] { dispatch(); }, row_bytes + slot_bytes);
    exchange_row(
        "combine (y)", [&] { exchange.combine(partial, y); }, row_bytes);
    exchange_row(
        "dispatch_grad (dy)",
        [&] {
          exchange.start_dispatch_grad(dy_);
          exchange.owned_dy();
        },
        row_bytes);
    exchange_row(
        "combine_grad (dx, dgates)",
        [&] {
          exchange.combine_grad(partial, partial_dgates, dx, dgates);
          exchange.wait();
        },
        row_bytes + double(P - 1) * T * S * 4);
    const Tensor send = random_tensor({P * T, c_.D}, DType::bf16, 8, 1.0f);
    Tensor recv = Tensor::empty({P * T, c_.D}, DType::bf16, Device::cuda);
    const std::vector<int64_t> counts(P, T);
    exchange_row(
        "plain all-to-all (T x D to each peer)",
        [&] { comm_.all_to_all(send, counts, recv, counts); }, row_bytes);
  }

  void layer_row(const char* op, double ms) const {
    if (comm_.rank() == 0)
      std::printf("| %s | %d | %s | %.4f | | | |\n", c_.name, comm_.size(), op, ms);
  }

  const LayerCase& c_;
  Communicator& comm_;
  int reps_;
  const MoeConfig moe_;
  Tensor x_, dy_;
};

int run(int argc, char** argv, MpiSession& mpi) {
  const Options opt = parse_args(argc, argv);
  FLASHMOE_CHECK(cuda_available(), "flashmoe-bench-ep needs a CUDA device, found none");
  select_rank_device(mpi.rank());
  std::unique_ptr<Communicator> comm =
      mpi.size() == 1 ? make_local_communicator() : make_nccl_communicator(MPI_COMM_WORLD);
  if (mpi.rank() == 0) {
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("%d x %s, bf16, T tokens per GPU\n\n", mpi.size(), prop.name);
    std::printf(
        "| case | GPUs | op | median ms | ms in a run | MB to peers | GB/s in a run |\n"
        "|---|---|---|---|---|---|---|\n");
  }
  // smoke: one block of configs/smoke.yaml at its 16384 tokens per GPU.
  const LayerCase cases[] = {{"smoke", 16384, 256, 1024, 16384, 16, 1},
                             {"quickstart", 4096, 1024, 4096, 16384, 64, 1}};
  for (const LayerCase& c : cases) {
    if (!opt.cases.empty() &&
        std::find(opt.cases.begin(), opt.cases.end(), c.name) == opt.cases.end())
      continue;
    EpBench(c, *comm, opt.reps).run();
  }
  return 0;
}

}  // namespace
}  // namespace flashmoe

int main(int argc, char** argv) {
  flashmoe::MpiSession mpi(&argc, &argv);
  try {
    return flashmoe::run(argc, argv, mpi);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flashmoe-bench-ep: error: %s\n", e.what());
    if (mpi.size() > 1) flashmoe::MpiSession::abort_job(1);
    return 1;
  }
}
