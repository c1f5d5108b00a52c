// The single-rank communicator and the argument checks every all_to_all shares.
#include <gtest/gtest.h>

#include "core/bf16.h"
#include "parallel/communicator.h"
#include "parallel/expert_parallel.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

using test::error_of;

// The expert exchange's sum of P partials: block p of the inbox, the own block in
// place of block `own`, added in rank order in fp32 and rounded once.
TEST(Communicator, SumBlocksAddsInRankOrderAndRoundsOnce) {
  const int64_t n = 2, width = 5, blocks = 3, own = 1;
  std::vector<float> inbox(blocks * n * width), own_block(n * width);
  for (size_t i = 0; i < inbox.size(); ++i) inbox[i] = 1.0f + 0.001f * float(i);
  for (size_t i = 0; i < own_block.size(); ++i) own_block[i] = -0.5f + 0.003f * float(i);
  for (DType dtype : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const Tensor in = Tensor::from_floats(inbox, {blocks * n, width}, dtype, Device::cpu),
                 mine = Tensor::from_floats(own_block, {n, width}, dtype, Device::cpu);
    const std::vector<float> stored_in = in.to_floats(), stored_mine = mine.to_floats();
    Tensor sum;
    detail::sum_blocks(in, mine, own, sum);
    const std::vector<float> got = sum.to_floats();
    for (int64_t i = 0; i < n * width; ++i) {
      float want = 0;
      for (int64_t p = 0; p < blocks; ++p) {
        want += p == own ? stored_mine[i] : stored_in[p * n * width + i];
      }
      EXPECT_EQ(got[i], dtype == DType::bf16 ? round_bf16(want) : want) << "element " << i;
    }
  }
  const Tensor ragged = Tensor::zeros({5, width}, DType::f32, Device::cpu);
  Tensor out;
  EXPECT_NE(
      error_of([&] {
        detail::sum_blocks(ragged, Tensor::zeros({n, width}, DType::f32, Device::cpu), 0, out);
      }).find("expected an inbox of whole blocks"),
      std::string::npos);
}

// The peer-copy dispatch's split of a rank's routing: owner p's block holds what
// own_routing keeps for p, and the own block goes to the own buffers.
TEST(Communicator, SplitRoutingGivesEachOwnerItsSlots) {
  const int64_t T = 5, S = 3, local_experts = 4;
  for (int owners : {1, 2, 3}) {
    for (int own = 0; own < owners; ++own) {
      SCOPED_TRACE(testing::Message() << "owners=" << owners << " own=" << own);
      const Tensor ids = Tensor::from_vector(
          test::ids_with_empties(T * S, owners * local_experts, owners + own), {T, S}, Device::cpu);
      const Tensor gates =
          Tensor::from_floats(test::uniforms(T * S, 5, own, 0, 1), {T, S}, DType::f32, Device::cpu);
      Tensor split_ids, split_gates;
      Tensor own_ids = Tensor::zeros({T, S}, DType::i32, Device::cpu),
             own_gates = Tensor::zeros({T, S}, DType::f32, Device::cpu);
      detail::split_routing(ids, gates, owners, local_experts, own, split_ids, split_gates, own_ids,
                            own_gates);
      for (int p = 0; p < owners; ++p) {
        Tensor want_ids, want_gates;
        detail::own_routing(ids, gates, p * local_experts, local_experts, want_ids, want_gates);
        const Tensor& got_ids = p == own ? own_ids : split_ids.rows(p * T, (p + 1) * T);
        const Tensor& got_gates = p == own ? own_gates : split_gates.rows(p * T, (p + 1) * T);
        EXPECT_EQ(got_ids.to_vector<int32_t>(), want_ids.to_vector<int32_t>()) << "owner " << p;
        EXPECT_EQ(got_gates.to_floats(), want_gates.to_floats()) << "owner " << p;
      }
    }
  }
}

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
