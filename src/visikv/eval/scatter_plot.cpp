#include "visikv/eval/scatter_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "visikv/core/error.h"

namespace visikv {

namespace {

constexpr int kPanelWidth = 560, kPanelHeight = 540, kLegendWidth = 300, kTitleHeight = 40;
constexpr int kLeft = 80, kRight = 20, kTop = 40, kBottom = 60;  // plot-area margins in a panel
constexpr Rgb kBlack{0, 0, 0}, kGrid{225, 225, 225}, kGrey{110, 110, 110};

struct Range {
  int lo = 0, hi = 1;  // decades: 10^lo .. 10^hi
};

Range decade_range(const std::vector<double>& values) {
  double lo = INFINITY, hi = -INFINITY;
  for (double v : values)
    if (v > 0 && std::isfinite(v)) {
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  if (!std::isfinite(lo)) return {-1, 0};
  Range r{static_cast<int>(std::floor(std::log10(lo))),
          static_cast<int>(std::ceil(std::log10(hi)))};
  if (r.hi <= r.lo) r.hi = r.lo + 1;
  return r;
}

std::string decade_label(int e) {
  if (e >= -2 && e <= 3) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%g", std::pow(10.0, e));
    return buffer;
  }
  return "1E" + std::to_string(e);
}

void draw_panel(PngImage& image, const ScatterPanel& panel, int x0, int y0) {
  const int left = x0 + kLeft, right = x0 + kPanelWidth - kRight, top = y0 + kTop,
            bottom = y0 + kPanelHeight - kBottom;
  std::vector<double> xs, ys;
  size_t hidden = 0;
  for (const ScatterSeries& s : panel.series)
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (s.x[i] > 0 && s.y[i] > 0 && std::isfinite(s.x[i]) && std::isfinite(s.y[i])) {
        xs.push_back(s.x[i]);
        ys.push_back(s.y[i]);
      } else {
        ++hidden;
      }
    }
  Range rx = decade_range(xs), ry = decade_range(ys);
  if (!panel.diagonal.empty()) {  // the same decades on both axes, so y = x is the diagonal
    rx = ry = {std::min(rx.lo, ry.lo), std::max(rx.hi, ry.hi)};
  }
  // A linear x axis spans whole units: [floor(min), ceil(max)].
  Range ux{0, 1};
  if (panel.linear_x && !xs.empty()) {
    ux = {static_cast<int>(std::floor(*std::min_element(xs.begin(), xs.end()))),
          static_cast<int>(std::ceil(*std::max_element(xs.begin(), xs.end())))};
    if (ux.hi <= ux.lo) ux.hi = ux.lo + 1;
  }
  auto px = [&](double v) {
    const double at =
        panel.linear_x ? (v - ux.lo) / (ux.hi - ux.lo) : (std::log10(v) - rx.lo) / (rx.hi - rx.lo);
    return left + static_cast<int>(std::lround(at * (right - left)));
  };
  auto py = [&](double v) {
    return bottom - static_cast<int>(
                        std::lround((std::log10(v) - ry.lo) / (ry.hi - ry.lo) * (bottom - top)));
  };
  // Decade grid and tick labels (every other decade when there are many).
  const int x_step = (rx.hi - rx.lo) > 8 ? 2 : 1, y_step = (ry.hi - ry.lo) > 8 ? 2 : 1;
  for (int u = ux.lo; panel.linear_x && u <= ux.hi; ++u) {
    const int x = px(u);
    image.line(x, top, x, bottom, kGrid);
    image.line(x, bottom, x, bottom + 5, kBlack);
    const std::string label = std::to_string(u);
    image.text(x - PngImage::text_width(label) / 2, bottom + 9, label, kBlack);
  }
  for (int e = rx.lo; !panel.linear_x && e <= rx.hi; ++e) {
    const int x = px(std::pow(10.0, e));
    image.line(x, top, x, bottom, kGrid);
    image.line(x, bottom, x, bottom + 5, kBlack);
    if ((e - rx.lo) % x_step == 0) {
      const std::string label = decade_label(e);
      image.text(x - PngImage::text_width(label) / 2, bottom + 9, label, kBlack);
    }
  }
  for (int e = ry.lo; e <= ry.hi; ++e) {
    const int y = py(std::pow(10.0, e));
    image.line(left, y, right, y, kGrid);
    image.line(left - 5, y, left, y, kBlack);
    if ((e - ry.lo) % y_step == 0) {
      const std::string label = decade_label(e);
      image.text(left - 9 - PngImage::text_width(label), y - 3, label, kBlack);
    }
  }
  if (!panel.diagonal.empty())
    image.dashed_line(px(std::pow(10.0, rx.lo)), py(std::pow(10.0, ry.lo)),
                      px(std::pow(10.0, rx.hi)), py(std::pow(10.0, ry.hi)), kGrey);
  for (size_t k = 0; k < panel.series.size(); ++k) {
    const ScatterSeries& s = panel.series[k];
    if (panel.lines) {
      std::vector<std::pair<double, double>> points;
      for (size_t i = 0; i < s.x.size(); ++i)
        if (s.x[i] > 0 && s.y[i] > 0 && std::isfinite(s.x[i]) && std::isfinite(s.y[i]))
          points.emplace_back(s.x[i], s.y[i]);
      std::sort(points.begin(), points.end());
      for (size_t i = 1; i < points.size(); ++i)
        image.line(px(points[i - 1].first), py(points[i - 1].second), px(points[i].first),
                   py(points[i].second), series_color(k));
    }
    for (size_t i = 0; i < s.x.size(); ++i)
      if (s.x[i] > 0 && s.y[i] > 0 && std::isfinite(s.x[i]) && std::isfinite(s.y[i]))
        image.marker(px(s.x[i]), py(s.y[i]), 2, series_color(k));
  }
  // Frame, labels, title.
  image.line(left, top, right, top, kBlack);
  image.line(left, bottom, right, bottom, kBlack);
  image.line(left, top, left, bottom, kBlack);
  image.line(right, top, right, bottom, kBlack);
  image.text((left + right - PngImage::text_width(panel.x_label, 2)) / 2, bottom + 26,
             panel.x_label, kBlack, 2);
  image.text_vertical(x0 + 8, (top + bottom + PngImage::text_width(panel.y_label, 2)) / 2,
                      panel.y_label, kBlack, 2);
  image.text((left + right - PngImage::text_width(panel.title, 2)) / 2, y0 + 12, panel.title,
             kBlack, 2);
  if (hidden > 0) {
    const std::string note = std::to_string(hidden) + " cells at 0 not shown";
    image.text(right - PngImage::text_width(note) - 4, top + 6, note, kGrey);
  }
}

}  // namespace

Rgb series_color(size_t i) {
  static constexpr Rgb kPalette[] = {
      {31, 119, 180},  {255, 127, 14}, {44, 160, 44},   {214, 39, 40},
      {148, 103, 189}, {140, 86, 75},  {227, 119, 194}, {127, 127, 127},
      {188, 189, 34},  {23, 190, 207}, {0, 0, 128},     {128, 0, 0},
      {0, 128, 128},   {128, 128, 0},  {255, 0, 255},   {0, 0, 0}};
  return kPalette[i % (sizeof kPalette / sizeof kPalette[0])];
}

std::pair<int, int> write_loglog_scatter(const std::vector<ScatterPanel>& panels,
                                         const std::string& title,
                                         const std::filesystem::path& path) {
  require(!panels.empty(), "scatter plot: no panels");
  for (const ScatterPanel& p : panels)
    for (const ScatterSeries& s : p.series)
      require(s.x.size() == s.y.size(), "scatter plot: series '", s.label, "' has ", s.x.size(),
              " x values and ", s.y.size(), " y values");
  const int width = static_cast<int>(panels.size()) * kPanelWidth + kLegendWidth;
  const int height = kTitleHeight + kPanelHeight;
  PngImage image(width, height);
  image.text(12, 12, title, kBlack, 2);
  for (size_t i = 0; i < panels.size(); ++i)
    draw_panel(image, panels[i], static_cast<int>(i) * kPanelWidth, kTitleHeight);
  // Legend: the series of the first panel, then the diagonal.
  int x = static_cast<int>(panels.size()) * kPanelWidth + 10, y = kTitleHeight + kTop;
  image.text(x, y, "key codec (cells)", kBlack, 1);
  y += 16;
  for (size_t k = 0; k < panels.front().series.size(); ++k) {
    image.fill_rect(x, y, x + 8, y + 8, series_color(k));
    image.text(x + 14, y + 1, panels.front().series[k].label, kBlack);
    y += 14;
  }
  for (const ScatterPanel& p : panels)
    if (!p.diagonal.empty()) {
      image.dashed_line(x, y + 4, x + 10, y + 4, kGrey, 3);
      image.text(x + 14, y + 1, p.diagonal, kBlack);
      y += 14;
      break;
    }
  image.write(path);
  return {width, height};
}

}  // namespace visikv
