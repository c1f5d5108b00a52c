// The single-rank communicator and the argument checks every all_to_all shares.
#include <gtest/gtest.h>

#include "parallel/communicator.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

using test::error_of;

TEST(Communicator, LayoutGivesBytesAndOffsetsPerPeer) {
  Tensor send = Tensor::zeros({5, 3}, DType::f32, Device::cpu);
  Tensor recv = Tensor::zeros({4, 3}, DType::f32, Device::cpu);
  const AllToAllLayout layout = all_to_all_layout(send, {2, 0, 3}, recv, {1, 3, 0}, 3);
  EXPECT_EQ(layout.send_bytes, (std::vector<int64_t>{24, 0, 36}));
  EXPECT_EQ(layout.send_offset, (std::vector<int64_t>{0, 24, 24}));
  EXPECT_EQ(layout.recv_bytes, (std::vector<int64_t>{12, 36, 0}));
  EXPECT_EQ(layout.recv_offset, (std::vector<int64_t>{0, 12, 48}));
  Tensor empty = Tensor::zeros({0, 3}, DType::f32, Device::cpu);  // still has 12-byte rows
  EXPECT_EQ(all_to_all_layout(empty, {0, 0}, recv, {2, 2}, 2).recv_bytes[1], 24);
}

TEST(Communicator, LayoutErrorsNameTheProblem) {
  Tensor send = Tensor::zeros({5, 3}, DType::f32, Device::cpu);
  Tensor recv = Tensor::zeros({4, 3}, DType::f32, Device::cpu);
  Tensor wide = Tensor::zeros({4, 4}, DType::f32, Device::cpu);
  EXPECT_NE(error_of([&] {
              all_to_all_layout(send, {5}, recv, {4}, 2);
            }).find("send counts has 1 entries, expected one per rank (2)"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              all_to_all_layout(send, {3, 3}, recv, {2, 2}, 2);
            }).find("expected at most the buffer's 60"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              all_to_all_layout(send, {1, -1}, recv, {0, 0}, 2);
            }).find(">= 0"),
            std::string::npos);
  EXPECT_NE(error_of([&] { all_to_all_layout(send, {1}, wide, {1}, 1); }).find("equal rows"),
            std::string::npos);
}

TEST(Communicator, LocalCollectivesAreTheIdentity) {
  auto comm = make_local_communicator();
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->size(), 1);
  Tensor t = Tensor::from_floats({1, 2, 3}, {3}, DType::f32, Device::cpu);
  comm->all_reduce_sum(t);
  EXPECT_EQ(t.to_floats(), (std::vector<float>{1, 2, 3}));
  Tensor recv = Tensor::zeros({3}, DType::f32, Device::cpu);
  comm->all_to_all(t, {2}, recv, {2});
  EXPECT_EQ(recv.to_floats(), (std::vector<float>{1, 2, 0}));
  EXPECT_THROW(comm->all_to_all(t, {2}, recv, {1}), Error);
}

}  // namespace
}  // namespace flashmoe
