#include "visikv/kv/store_factory.h"

#include "visikv/core/error.h"
#include "visikv/kv/headq.h"
#include "visikv/kv/value_policy.h"

namespace visikv {

namespace {

std::unique_ptr<RowStore> make_row_store(const CodecSpec& spec, int64_t head_dim,
                                         int64_t reserve_tokens) {
  check_codec_fits(spec, head_dim);
  if (spec.is_dense()) return make_dense_store(spec.dense, head_dim, reserve_tokens);
  return make_int_store(spec, head_dim, reserve_tokens);
}

}  // namespace

std::unique_ptr<KeyStore> make_key_store(const CodecSpec& spec, int64_t head_dim,
                                         int64_t reserve_tokens, std::vector<float> headq_rows) {
  require(!spec.policy, "key codec '", spec.text(), "': value bit policies are for values only");
  require(!spec.is_qbasis(), "key codec '", spec.text(),
          "': a query-basis store needs its head's calibrated constants (make_qbasis_key_store)");
  std::unique_ptr<KeyStore> rows = make_row_store(spec, head_dim, reserve_tokens);
  if (!spec.headq) return rows;
  return make_headq_key_store(std::move(rows), spec, std::move(headq_rows));
}

std::unique_ptr<ValueStore> make_value_store(const CodecSpec& spec, int64_t head_dim,
                                             int64_t reserve_tokens) {
  require(!spec.headq, "value codec '", spec.text(), "': the HeadQ side code is for keys only");
  require(!spec.is_qbasis(), "value codec '", spec.text(),
          "': query-basis quantization is for keys only");
  if (spec.policy) {
    check_codec_fits(spec, head_dim);
    require(reserve_tokens >= 0, "cache reserve must not be negative, got ", reserve_tokens);
    return std::make_unique<ValuePolicyStore>(spec, head_dim, reserve_tokens);
  }
  return make_row_store(spec, head_dim, reserve_tokens);
}

}  // namespace visikv
