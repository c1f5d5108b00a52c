// Expert parallelism (SPEC section 4) on the ranks of this job: the layer on P ranks, each
// with its shard of a global batch, against a single-rank layer on the whole batch, which
// every rank computes locally.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <functional>

#include "parallel/expert_parallel.h"
#include "parallel/mpi_communicator.h"
#include "tests/layer_compare.h"

namespace flashmoe {
namespace {

constexpr double kTolerance = 1e-6;

struct ShardedCase {
  test::LayerCase layer;  // T is the global batch
  const char* name;
};

class ExpertParallelLayer : public testing::TestWithParam<ShardedCase> {
 protected:
  // Host collectives of the checks; the layers use their own communicator.
  std::unique_ptr<Communicator> host_comm_ = make_mpi_communicator(MPI_COMM_WORLD);
};

// This rank's rows [r T/P, (r+1) T/P) of a global [T, ...] tensor.
Tensor shard_rows(const Tensor& t, const Communicator& comm) {
  const int64_t rows = t.size(0) / comm.size();
  return t.rows(comm.rank() * rows, (comm.rank() + 1) * rows);
}

std::vector<double> summed(const Tensor& grad, Communicator& host_comm) {
  Tensor sum = grad.to(Device::cpu);
  host_comm.all_reduce_sum(sum);
  return sum.to_doubles();
}

// NCCL over one GPU per rank, created once: the device must be chosen before it.
Communicator& nccl_communicator() {
  static std::unique_ptr<Communicator> comm = [] {
    int rank = 0;
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    CUDA_CHECK(cudaSetDevice(rank));
    return make_nccl_communicator(MPI_COMM_WORLD);
  }();
  return *comm;
}

// Why the NCCL tests cannot run here, or "" when they can: one GPU per rank.
std::string missing_gpus() {
  if (!cuda_available()) return "no CUDA device: GPU test skipped";
  int gpus = 0, ranks = 1;
  CUDA_CHECK(cudaGetDeviceCount(&gpus));
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &ranks));
  if (gpus < ranks) return "needs one GPU per rank, " + std::to_string(gpus) + " found";
  return "";
}

#define FLASHMOE_REQUIRE_GPU_PER_RANK()                                            \
  do {                                                                             \
    if (const std::string why = missing_gpus(); !why.empty()) GTEST_SKIP() << why; \
  } while (0)

void expect_matches_one_rank(const test::LayerCase& c, Device device, Communicator& comm,
                             Communicator& host_comm,
                             ExchangeKind exchange = ExchangeKind::automatic) {
  const int P = comm.size();
  ASSERT_EQ(c.T % P, 0);
  MoeConfig config = test::moe_config(c);
  config.exchange = exchange;
  FlashMoELayer whole(c.D, config, device, DType::f32, 7, 100);
  FlashMoELayer sharded(c.D, config, device, DType::f32, 7, 100, &comm);
  // A step on a batch of another size first (as when training alternates with eval):
  // the exchange re-sizes for it and back, and both layers' batchnorm statistics see
  // the same batches.
  const int64_t half = c.T / 2;
  if (half > 0 && half % P == 0) {
    const Tensor x_half = test::random_input({half, c.D}, DType::f32, device, 13);
    const Tensor dy_half = test::random_input({half, c.D}, DType::f32, device, 14);
    whole.forward(x_half, true);
    whole.backward(dy_half);
    sharded.forward(shard_rows(x_half, comm), true);
    sharded.backward(shard_rows(dy_half, comm));
  }
  const Tensor x = test::random_input({c.T, c.D}, DType::f32, device, 11);
  const Tensor dy = test::random_input({c.T, c.D}, DType::f32, device, 12);

  const std::vector<double> y_whole = whole.forward(x, true).to_doubles();
  const std::vector<double> dx_whole = whole.backward(dy).to_doubles();
  whole.finish_backward();
  const Tensor y = sharded.forward(shard_rows(x, comm), true);
  EXPECT_EQ(sharded.routing().expert_ids.to_vector<int32_t>(),
            shard_rows(whole.routing().expert_ids, comm).to_vector<int32_t>());
  const Tensor dx = sharded.backward(shard_rows(dy, comm));
  sharded.finish_backward();
  const int64_t rows = c.T / P, first = comm.rank() * rows;
  auto rows_of = [&](const std::vector<double>& v, int64_t begin, int64_t count, int64_t width) {
    return std::vector<double>(v.begin() + begin * width, v.begin() + (begin + count) * width);
  };
  EXPECT_LT(test::relative_error(y.to_doubles(), rows_of(y_whole, first, rows, c.D)), kTolerance);
  EXPECT_LT(test::relative_error(dx.to_doubles(), rows_of(dx_whole, first, rows, c.D)), kTolerance);
  const std::vector<Parameter*> mine = sharded.parameters(), all = whole.parameters();
  const int64_t local_E = c.E / P, first_expert = sharded.first_local_expert();
  EXPECT_EQ(first_expert, comm.rank() * local_E);
  for (size_t i = 0; i < mine.size(); ++i) {
    SCOPED_TRACE(mine[i]->name);
    if (!mine[i]->expert_table) {
      EXPECT_EQ(mine[i]->value.to_floats(), all[i]->value.to_floats());
      EXPECT_LT(test::relative_error(summed(mine[i]->grad, host_comm), all[i]->grad.to_doubles()),
                kTolerance);
      continue;
    }
    EXPECT_EQ(mine[i]->value.to_floats(),
              all[i]->value.rows(first_expert, first_expert + local_E).to_floats());
    EXPECT_LT(
        test::relative_error(mine[i]->grad.to_doubles(),
                             all[i]->grad.rows(first_expert, first_expert + local_E).to_doubles()),
        kTolerance);
  }
  if (c.balance > 0) {
    EXPECT_LT(test::relative_error(summed(sharded.balance_loss(), host_comm),
                                   whole.balance_loss().to_doubles()),
              kTolerance);
  }
  EXPECT_LT(test::relative_error(sharded.batchnorm().running_var, whole.batchnorm().running_var),
            kTolerance);
  EXPECT_LT(test::relative_error(sharded.batchnorm().running_mean, whole.batchnorm().running_mean),
            kTolerance);
}

TEST_P(ExpertParallelLayer, MatchesOneRankOnTheGlobalBatch) {
  expect_matches_one_rank(GetParam().layer, Device::cpu, *host_comm_, *host_comm_);
}

// The same on one GPU per rank (run by hand: mpirun -np P flashmoe-tests-mpi), with
// each transport: NCCL's collectives, and copies into the peers' memory.
TEST_P(ExpertParallelLayer, MatchesOneRankOnTheGlobalBatchOnGpus) {
  FLASHMOE_REQUIRE_GPU_PER_RANK();
  for (ExchangeKind exchange : {ExchangeKind::collectives, ExchangeKind::peer_copies}) {
    SCOPED_TRACE(to_string(exchange));
    expect_matches_one_rank(GetParam().layer, Device::cuda, nccl_communicator(), *host_comm_,
                            exchange);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ExpertParallelLayer,
    testing::Values(
        ShardedCase{{64, 32, 16, 64, 2, 4, Activation::silu, RouterNorm::batchnorm, true},
                    "BatchnormTwoHeads"},
        // The balance loss counts every rank's selections.
        ShardedCase{{64, 32, 16, 64, 2, 4, Activation::silu, RouterNorm::batchnorm, false, 0.5},
                    "BalanceLoss"},
        ShardedCase{{48, 24, 0, 144, 3, 2, Activation::gelu, RouterNorm::batchnorm, true},
                    "BatchnormThreeHeadsNoShared"},
        ShardedCase{{32, 16, 8, 16, 1, 3, Activation::relu, RouterNorm::rmsnorm, false},
                    "RmsnormFewExperts"},
        // One token per rank and one expert per token: some owners receive no rows.
        ShardedCase{{4, 8, 4, 64, 1, 1, Activation::silu, RouterNorm::none, false},
                    "OwnersWithoutRows"}),
    [](const testing::TestParamInfo<ShardedCase>& info) { return std::string(info.param.name); });

// The collectives of the exchange: all_gather puts rank p's rows at block p;
// reduce_scatter_sum gives rank r the sum over ranks of their block r.
void expect_gather_and_reduce_scatter(Communicator& comm, Device device) {
  const int P = comm.size(), r = comm.rank();
  const int64_t n = 3, width = 5;
  auto value = [](int rank, int64_t block, int64_t i) {
    return float(rank * 1000 + block * 100 + i);
  };
  std::vector<float> mine(n * width), blocks(P * n * width);
  for (int64_t i = 0; i < n * width; ++i) mine[i] = value(r, 0, i);
  for (int p = 0; p < P; ++p) {
    for (int64_t i = 0; i < n * width; ++i) blocks[p * n * width + i] = value(r, p, i);
  }
  for (DType dtype : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dtype));
    auto stored = [&](float v) { return dtype == DType::bf16 ? round_bf16(v) : v; };
    Tensor gathered = Tensor::empty({P * n, width}, dtype, device);
    comm.all_gather(Tensor::from_floats(mine, {n, width}, dtype, device), gathered);
    const std::vector<float> got = gathered.to_floats();
    for (int p = 0; p < P; ++p) {
      for (int64_t i = 0; i < n * width; ++i) {
        ASSERT_EQ(got[p * n * width + i], stored(value(p, 0, i))) << "block " << p;
      }
    }
    Tensor summed = Tensor::empty({n, width}, dtype, device);
    comm.reduce_scatter_sum(Tensor::from_floats(blocks, {P * n, width}, dtype, device), summed);
    const std::vector<float> sums = summed.to_floats();
    for (int64_t i = 0; i < n * width; ++i) {
      float want = 0;
      for (int p = 0; p < P; ++p) want += stored(value(p, r, i));
      EXPECT_NEAR(sums[i], want, dtype == DType::f32 ? 0.0 : 0.01 * want) << "element " << i;
    }
    Tensor wrong = Tensor::empty({P * n + 1, width}, dtype, device);
    EXPECT_THROW(comm.all_gather(Tensor::from_floats(mine, {n, width}, dtype, device), wrong),
                 Error);
  }
}

TEST(Collectives, AllGatherAndReduceScatter) {
  std::unique_ptr<Communicator> comm = make_mpi_communicator(MPI_COMM_WORLD);
  expect_gather_and_reduce_scatter(*comm, Device::cpu);
}

TEST(Collectives, AllGatherAndReduceScatterOnGpus) {
  FLASHMOE_REQUIRE_GPU_PER_RANK();
  expect_gather_and_reduce_scatter(nccl_communicator(), Device::cuda);
}

// all_reduce_sum in fp32 and fp64 over 1 to 16385 elements, a few rounds each, every
// other round on a second stream on the GPU. MPI sums in rank order, so it must give
// the rank-order sum's bits; NCCL the same sum to rounding.
template <class T>
void expect_all_reduce_sums(Communicator& comm, Device device) {
  const int P = comm.size(), r = comm.rank();
  std::unique_ptr<SideStream> side;
  if (device == Device::cuda) side = std::make_unique<SideStream>();
  for (int64_t n : {1, 7, 1000, 8192, 16385}) {
    for (int round = 0; round < 3; ++round) {
      SCOPED_TRACE(testing::Message()
                   << dtype_name(dtype_of<T>()) << ", " << n << " elements, round " << round);
      auto value = [&](int rank, int64_t i) {
        return T((rank + 1) * 0.37 + double(i % 97) * 1e-3 + round * 0.011);
      };
      std::vector<T> mine(n);
      for (int64_t i = 0; i < n; ++i) mine[i] = value(r, i);
      Tensor t = Tensor::from_vector(mine, {n}, device);
      if (side && round % 2 == 1) {
        run_beside(side.get(), [&] { comm.all_reduce_sum(t); });
        side->join();
      } else {
        comm.all_reduce_sum(t);
      }
      const std::vector<T> got = t.to_vector<T>();
      for (int64_t i = 0; i < n; ++i) {
        T want = value(0, i);
        for (int p = 1; p < P; ++p) want += value(p, i);
        if (device == Device::cpu) {
          ASSERT_EQ(got[i], want) << "element " << i;
        } else {
          ASSERT_NEAR(got[i], want, 1e-6 * std::abs(want)) << "element " << i;
        }
      }
    }
  }
}

TEST(Collectives, AllReduceSums) {
  std::unique_ptr<Communicator> comm = make_mpi_communicator(MPI_COMM_WORLD);
  expect_all_reduce_sums<float>(*comm, Device::cpu);
  expect_all_reduce_sums<double>(*comm, Device::cpu);
}

TEST(Collectives, AllReduceSumsOnGpus) {
  FLASHMOE_REQUIRE_GPU_PER_RANK();
  expect_all_reduce_sums<float>(nccl_communicator(), Device::cuda);
  expect_all_reduce_sums<double>(nccl_communicator(), Device::cuda);
}

// Every rank routes every slot to expert `target(t, s)` (-1: empty) of a table of 4
// experts per rank; returns the exchange's load imbalance.
double imbalance_of(Communicator& comm, Device device,
                    const std::function<int32_t(int64_t, int64_t)>& target) {
  const int64_t P = comm.size(), T = P, S = 3;
  std::vector<int32_t> ids(T * S);
  for (int64_t i = 0; i < T * S; ++i) ids[i] = target(i / S, i % S);
  ExpertExchange exchange(comm, 4 * P, S, device);
  exchange.start_dispatch(Tensor::zeros({T, 2}, DType::f32, device));
  exchange.dispatch(Tensor::from_vector(ids, {T, S}, device),
                    Tensor::zeros({T, S}, DType::f32, device));
  for (int peer : exchange.peers()) exchange.receive(peer);
  return exchange.load_imbalance();
}

void expect_load_imbalance(Communicator& comm, Device device) {
  const int P = comm.size();
  // Slot s < 2 of token t on owner (2 t + s) mod P (T = P tokens: every owner gets
  // two slots of every rank); slot 2 empty.
  EXPECT_DOUBLE_EQ(imbalance_of(comm, device,
                                [&](int64_t t, int64_t s) {
                                  return s == 2 ? -1 : static_cast<int32_t>(4 * ((2 * t + s) % P));
                                }),
                   1.0);
  // Every filled slot on owner 0's expert 1: it computes everything.
  EXPECT_DOUBLE_EQ(imbalance_of(comm, device, [](int64_t, int64_t s) { return s == 2 ? -1 : 1; }),
                   double(P));
}

TEST(ExpertParallelConfig, LoadImbalanceComparesOwnersFilledSlots) {
  std::unique_ptr<Communicator> comm = make_mpi_communicator(MPI_COMM_WORLD);
  if (comm->size() == 1) GTEST_SKIP() << "needs more than one rank";
  expect_load_imbalance(*comm, Device::cpu);
}

TEST(ExpertParallelConfig, LoadImbalanceComparesOwnersFilledSlotsOnGpus) {
  FLASHMOE_REQUIRE_GPU_PER_RANK();
  if (nccl_communicator().size() == 1) GTEST_SKIP() << "needs more than one rank";
  expect_load_imbalance(nccl_communicator(), Device::cuda);
}

// Every rank sees every rank's count, so every rank stops with the same error.
TEST(ExpertParallelConfig, UnequalTokenCountsAreAnErrorOnEveryRank) {
  std::unique_ptr<Communicator> comm = make_mpi_communicator(MPI_COMM_WORLD);
  if (comm->size() == 1) GTEST_SKIP() << "needs more than one rank";
  ExpertExchange exchange(*comm, 4 * comm->size(), 1, Device::cpu);
  const int64_t T = 2 + comm->rank();
  const Tensor x = Tensor::zeros({T, 4}, DType::f32, Device::cpu);
  try {
    exchange.start_dispatch(x);
    FAIL() << "unequal token counts were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected as many on every rank"), std::string::npos)
        << e.what();
  }
}

TEST(ExpertParallelConfig, PeerCopiesOnTheCpuBackendAreRefused) {
  std::unique_ptr<Communicator> comm = make_mpi_communicator(MPI_COMM_WORLD);
  try {
    ExpertExchange exchange(*comm, 4 * comm->size(), 2, Device::cpu, ExchangeKind::peer_copies);
    ADD_FAILURE() << "expected an error for peer copies on the cpu backend";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected GPUs"), std::string::npos) << e.what();
  }
}

TEST(ExpertParallelConfig, ExpertsNotDivisibleByRanksAreRefused) {
  std::unique_ptr<Communicator> comm = make_mpi_communicator(MPI_COMM_WORLD);
  if (comm->size() == 1) GTEST_SKIP() << "needs more than one rank";
  const int64_t E = comm->size() % 3 == 0 ? 16 : 9;  // a product-key square P does not divide
  test::LayerCase c{8, 8, 0, E, 1, 1, Activation::silu, RouterNorm::none, false};
  try {
    FlashMoELayer layer(c.D, test::moe_config(c), Device::cpu, DType::f32, 1, 0, comm.get());
    ADD_FAILURE() << "expected an error for " << c.E << " experts on " << comm->size() << " ranks";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected a multiple of the"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace flashmoe
