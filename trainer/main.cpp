// flashmoe-train CONFIG.yaml [--set key.path=value]...
//
// Single process: `flashmoe-train configs/smoke.yaml`. Several GPUs:
// `mpirun -np P flashmoe-train configs/ep2.yaml`, one rank per GPU. Ctrl-C stops at
// the next step boundary and saves a checkpoint.
#include <cuda_runtime.h>

#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "core/log.h"
#include "parallel/mpi_communicator.h"
#include "trainer/trainer.h"

namespace {

struct Arguments {
  std::string config_path;
  std::vector<std::string> overrides;
};

Arguments parse_arguments(int argc, char** argv) {
  Arguments args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--set") {
      FLASHMOE_CHECK(i + 1 < argc, "--set needs key.path=value");
      args.overrides.push_back(argv[++i]);
    } else if (arg.rfind("--set=", 0) == 0) {
      args.overrides.push_back(arg.substr(6));
    } else if (args.config_path.empty() && arg.rfind("--", 0) != 0) {
      args.config_path = arg;
    } else {
      FLASHMOE_FAIL("unexpected argument " << arg
                                           << ", expected: flashmoe-train CONFIG.yaml "
                                              "[--set key.path=value]...");
    }
  }
  FLASHMOE_CHECK(!args.config_path.empty(),
                 "no config given, expected: flashmoe-train CONFIG.yaml [--set key.path=value]...");
  return args;
}

void on_interrupt(int) { flashmoe::Trainer::request_stop(); }

int run(int argc, char** argv, flashmoe::MpiSession& mpi) {
  using namespace flashmoe;
  set_log_rank(mpi.size() > 1 ? mpi.rank() : -1);
  const Arguments args = parse_arguments(argc, argv);
  const RunConfig config = load_config(args.config_path, args.overrides);
  if (config.train.device == Device::cuda) {
    FLASHMOE_CHECK(cuda_available(), args.config_path
                                         << ": train.device is cuda but no CUDA device is "
                                            "available (use train.device: cpu)");
    select_rank_device(mpi.rank());
  }
  std::unique_ptr<Communicator> comm = mpi.size() == 1 ? make_local_communicator()
                                       : config.train.device == Device::cuda
                                           ? make_nccl_communicator(MPI_COMM_WORLD)
                                           : make_mpi_communicator(MPI_COMM_WORLD);
  std::signal(SIGINT, on_interrupt);
  std::signal(SIGTERM, on_interrupt);
  Trainer trainer(config, *comm);
  trainer.run();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  flashmoe::MpiSession mpi(&argc, &argv);
  try {
    return run(argc, argv, mpi);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flashmoe-train: error: %s\n", e.what());
    // Other ranks may be waiting in a collective: end them too, never hang.
    if (mpi.size() > 1) flashmoe::MpiSession::abort_job(1);
    return 1;
  }
}
