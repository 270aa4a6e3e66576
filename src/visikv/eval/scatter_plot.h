// Log-log (or linear-x, log-y) scatter plots written as PNG (core/png_image.h): one or more panels
// side by side, each with decade ticks, axis labels and an optional y = x line, and one legend of
// series.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "visikv/core/png_image.h"

namespace visikv {

struct ScatterSeries {
  std::string label;
  std::vector<double> x, y;  // points with x <= 0 or y <= 0 are not drawn (and are counted)
};

struct ScatterPanel {
  std::string title, x_label, y_label;
  std::vector<ScatterSeries> series;  // the same labels, in the same order, in every panel
  std::string diagonal;               // when not empty: the line y = x, with this legend label
  bool linear_x = false;  // x on a linear axis from floor(min) to ceil(max), a tick per unit
  bool lines = false;     // join each series' points in order of x
};

// A distinct colour for series i (a fixed palette, cycled).
Rgb series_color(size_t i);

// Draws the panels side by side under `title` and writes the PNG. Returns the image size.
// Throws visikv::Error for no panels, unequal x/y lengths or an unwritable file.
std::pair<int, int> write_loglog_scatter(const std::vector<ScatterPanel>& panels,
                                         const std::string& title,
                                         const std::filesystem::path& path);

}  // namespace visikv
