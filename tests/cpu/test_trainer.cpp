// End-to-end training on the CPU backend: the loss falls, a resumed run continues
// bit for bit, and bad checkpoints are refused without touching anything on disk.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "parallel/communicator.h"
#include "trainer/trainer.h"

namespace flashmoe {
namespace {

namespace fs = std::filesystem;

class TrainerTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        fs::temp_directory_path() / ("flashmoe-trainer-" + std::to_string(::getpid()) + "-" +
                                     testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // configs/cpu-tiny.yaml, shrunk to run in a second, checkpoints under the temp dir.
  RunConfig tiny(int64_t steps, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> overrides = {
        "train.steps=" + std::to_string(steps),     "train.eval_every=0", "log.every=1",
        "checkpoint.dir=" + (dir_ / "ck").string(), "checkpoint.every=0", "optim.warmup=5"};
    overrides.insert(overrides.end(), extra.begin(), extra.end());
    return load_config(std::string(FLASHMOE_SOURCE_DIR) + "/configs/cpu-tiny.yaml", overrides);
  }

  static std::vector<std::vector<float>> parameter_values(Trainer& t) {
    std::vector<std::vector<float>> out;
    for (Parameter* p : t.model().parameters()) out.push_back(p->value.to_floats());
    return out;
  }

  static std::vector<double> losses(const Trainer& t) {
    std::vector<double> out;
    for (const StepLog& log : t.history()) out.push_back(log.loss);
    return out;
  }

  fs::path dir_;
  std::unique_ptr<Communicator> comm_ = make_local_communicator();
};

TEST_F(TrainerTest, ThirtyStepsLowerTheLoss) {
  Trainer trainer(tiny(30, {"checkpoint.dir=\"\""}), *comm_);
  trainer.run();
  const std::vector<double> l = losses(trainer);
  ASSERT_EQ(l.size(), 30u);
  const double first = (l[0] + l[1] + l[2]) / 3, last = (l[27] + l[28] + l[29]) / 3;
  EXPECT_LT(last, 0.7 * first) << "first " << first << ", last " << last;
}

TEST_F(TrainerTest, ResumeContinuesBitwise) {
  Trainer straight(tiny(20, {"checkpoint.dir=\"\""}), *comm_);
  straight.run();

  Trainer first(tiny(20), *comm_);
  first.run(/*stop_at=*/10);  // saves step 10, as Ctrl-C would
  ASSERT_TRUE(fs::exists(dir_ / "ck" / "step_00000010"));
  Trainer second(tiny(20), *comm_);  // resume: auto
  ASSERT_EQ(second.step(), 10);
  second.run();

  std::vector<double> resumed = losses(first);
  const std::vector<double> rest = losses(second);
  resumed.insert(resumed.end(), rest.begin(), rest.end());
  EXPECT_EQ(resumed, losses(straight));  // bitwise: exact equality of every loss
  EXPECT_EQ(parameter_values(second), parameter_values(straight));
}

TEST_F(TrainerTest, CorruptCheckpointIsRefusedAndKept) {
  Trainer(tiny(4, {"checkpoint.every=2"}), *comm_).run();
  const fs::path newest = dir_ / "ck" / "step_00000004";
  const fs::path shard = newest / "experts_rank0.safetensors";
  {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-5, std::ios::end);
    f.put('\x7f');
  }
  const auto size_before = fs::file_size(shard);
  try {
    Trainer t(tiny(8, {"checkpoint.resume=" + newest.string()}), *comm_);
    FAIL() << "a corrupt checkpoint was loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("corrupt"), std::string::npos) << e.what();
  }
  // resume: auto skips the corrupt one for the newest valid checkpoint.
  Trainer t(tiny(8), *comm_);
  EXPECT_EQ(t.step(), 2);
  EXPECT_TRUE(fs::exists(shard));
  EXPECT_EQ(fs::file_size(shard), size_before);
}

TEST_F(TrainerTest, MismatchedCheckpointIsRefusedBeforeLoading) {
  Trainer(tiny(2), *comm_).run();
  try {
    Trainer t(tiny(4, {"model.d_model=32"}), *comm_);
    FAIL() << "a checkpoint of other shapes was loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("shape"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace flashmoe
