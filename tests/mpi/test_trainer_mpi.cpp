// The training loop on the ranks of this job against one rank on the same global batch,
// and a resumed multi-rank run against an uninterrupted one.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "parallel/mpi_communicator.h"
#include "tests/test_util.h"
#include "trainer/data.h"
#include "trainer/trainer.h"

namespace flashmoe {
namespace {

namespace fs = std::filesystem;

class MpiTrainer : public testing::Test {
 protected:
  // The same directory on every rank: rank 0's process id names it.
  void SetUp() override {
    int id = static_cast<int>(::getpid());
    MPI_CHECK(MPI_Bcast(&id, 1, MPI_INT, 0, MPI_COMM_WORLD));
    dir_ = fs::temp_directory_path() / ("flashmoe-mpi-trainer-" + std::to_string(id));
    comm_->barrier();
    if (comm_->rank() == 0) fs::remove_all(dir_);
    comm_->barrier();
  }
  void TearDown() override {
    comm_->barrier();
    if (comm_->rank() == 0) fs::remove_all(dir_);
  }

  // configs/cpu-tiny.yaml, shrunk: a step of 8 sequences of 16 tokens and a small eval.
  RunConfig tiny(int64_t steps, const std::string& checkpoint_dir,
                 const std::vector<std::string>& extra = {}) const {
    std::vector<std::string> overrides = {
        "train.steps=" + std::to_string(steps),
        "train.eval_every=0",
        "train.eval_tokens=256",
        "train.batch_tokens=128",
        "model.seq_len=16",
        "log.every=1",
        "optim.warmup=2",
        "checkpoint.dir=" + (checkpoint_dir.empty() ? std::string("\"\"") : checkpoint_dir),
        "checkpoint.every=0"};
    overrides.insert(overrides.end(), extra.begin(), extra.end());
    return load_config(std::string(FLASHMOE_SOURCE_DIR) + "/configs/cpu-tiny.yaml", overrides);
  }

  static std::vector<double> losses(const Trainer& t) {
    std::vector<double> out;
    for (const StepLog& log : t.history()) out.push_back(log.loss);
    return out;
  }

  fs::path dir_;
  std::unique_ptr<Communicator> comm_ = make_mpi_communicator(MPI_COMM_WORLD);
};

// Adam's step m / (sqrt(v) + eps) magnifies the rounding of gradients near zero by up to
// lr / eps, so the parameters are compared with an eps that keeps it linear: what is
// tested is that the gradients agree, and through the losses the forward passes.
TEST_F(MpiTrainer, MatchesOneRankOnTheGlobalBatch) {
  const std::vector<std::string> linear_adam = {"optim.eps=1e-3"};
  std::unique_ptr<Communicator> local = make_local_communicator();
  Trainer one(tiny(4, "", linear_adam), *local);
  one.run();
  Trainer many(tiny(4, "", linear_adam), *comm_);
  many.run();

  const std::vector<double> expected = losses(one), got = losses(many);
  ASSERT_EQ(got.size(), expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_LT(std::abs(got[i] - expected[i]), 1e-6 * std::abs(expected[i])) << "step " << i + 1;
  }
  const std::vector<Parameter*> mine = many.model().parameters(), all = one.model().parameters();
  ASSERT_EQ(mine.size(), all.size());
  const int64_t local_E = one.model().moe_layers()[0]->num_experts() / comm_->size();
  const int64_t first = comm_->rank() * local_E;
  for (size_t i = 0; i < mine.size(); ++i) {
    const Tensor expected_value =
        all[i]->expert_table ? all[i]->value.rows(first, first + local_E) : all[i]->value;
    EXPECT_LT(test::relative_error(mine[i]->value, expected_value), 1e-6) << mine[i]->name;
  }
}

TEST_F(MpiTrainer, ResumeContinuesBitwise) {
  Trainer straight(tiny(20, ""), *comm_);
  straight.run();

  const std::string checkpoints = (dir_ / "ck").string();
  Trainer first(tiny(20, checkpoints), *comm_);
  first.run(/*stop_at=*/10);
  Trainer second(tiny(20, checkpoints), *comm_);  // resume: auto
  ASSERT_EQ(second.step(), 10);
  second.run();

  std::vector<double> resumed = losses(first);
  const std::vector<double> rest = losses(second);
  resumed.insert(resumed.end(), rest.begin(), rest.end());
  EXPECT_EQ(resumed, losses(straight));
  const std::vector<Parameter*> a = second.model().parameters(), b = straight.model().parameters();
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]->value.to_floats(), b[i]->value.to_floats()) << a[i]->name;
  }
}

}  // namespace
}  // namespace flashmoe

namespace flashmoe {
namespace {

// configs/ep{P}.yaml: the smoke model on P GPUs, 16384 tokens per GPU, shardable.
TEST(EpConfigs, ParseWithTheSmokeModelAndShard) {
  const std::string dir = std::string(FLASHMOE_SOURCE_DIR) + "/configs/";
  const RunConfig smoke = load_config(dir + "smoke.yaml", {});
  for (int P : {2, 4}) {
    SCOPED_TRACE("ep" + std::to_string(P));
    const RunConfig ep = load_config(dir + "ep" + std::to_string(P) + ".yaml", {});
    EXPECT_TRUE(ep.model == smoke.model && ep.moe == smoke.moe && ep.optim == smoke.optim &&
                ep.data == smoke.data);
    EXPECT_EQ(ep.moe.num_experts % P, 0);
    EXPECT_EQ(ep.train.device, Device::cuda);
    EXPECT_EQ(ep.train.batch_tokens, 16384 * P);
    for (int rank = 0; rank < P; ++rank) {
      EXPECT_EQ(DataLoader(ep, rank, P).next_batch().sequences * ep.model.seq_len, 16384);
    }
  }
}

}  // namespace
}  // namespace flashmoe
