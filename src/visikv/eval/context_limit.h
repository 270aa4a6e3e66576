// The positions a run feeds a model against the context it was trained for
// (Config::max_positions). Past it a RoPE model attends at rotation angles it never saw and a
// model with learned positions has no embedding at all, so every command checks the positions it
// will feed before any forward pass, here, with one message.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "visikv/model/config.h"

namespace visikv {

enum class PastContext {
  Refuse,  // an error
  Offer,   // an error that names --allow-past-context (the command has that flag)
  Allow,   // --allow-past-context was given: a RoPE model runs past its context
};

// Checks that `positions` positions (0 .. positions - 1) fit the model's context. `what` names
// what needs them, e.g. "--window 2048" or "a prompt of 300 tokens". Throws visikv::Error naming
// both numbers unless `past` is Allow and the model's positions are rotary (learned positions
// have no rows past their table, so they refuse even then). Returns whether the run goes past
// the context (only with Allow), so the caller can warn once. A model that states no context
// (max_positions <= 0) fits any length.
bool check_context(const Config& config, int64_t positions, std::string_view what,
                   PastContext past = PastContext::Refuse);

// The one warning for a run allowed past the context (no trailing newline).
std::string past_context_warning(const Config& config, int64_t positions, std::string_view what);

}  // namespace visikv
