# One-compartment oral PK fitted by R nlme (Lindstrom-Bates), called by benchmarks/peers/run.py.
#
#   Rscript nlme_fit.R data.csv out.csv
#
# data.csv: long format with columns Id, Dose (mg), Time (h), Concentration (mg/L).
# The model is SSfol (parameters lKe, lKa, lCl) reparameterised to log ka, log ke, log V (lCl = lV + lKe), so that the
# diagonal random effects on (lKa, lKe, lV) are exactly the population model amortized-nlme fits; the gradient is
# SSfol's own, chained through the reparameterisation. Residual error: additive (nlme's default).
# out.csv: one row per quantity (name, estimate, lower, upper) on the log scale for the fixed effects and on the
# natural scale for the random-effect sds and sigma (95% intervals from intervals()), plus fit_s, converged, message.
suppressPackageStartupMessages(library(nlme))

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 2) stop("usage: Rscript nlme_fit.R data.csv out.csv")
dat <- read.csv(args[1])
dat <- dat[order(dat$Id, dat$Time), ]
dat$Id <- factor(dat$Id, levels = unique(dat$Id))

# SSfol in the (lKa, lKe, lV) parameterisation: value and gradient from SSfol, chain rule for lCl = lV + lKe.
folV <- function(Dose, input, lKa, lKe, lV) {
  v <- SSfol(Dose, input, lKe, lKa, lV + lKe)
  g <- attr(v, "gradient")
  attr(v, "gradient") <- cbind(lKa = g[, "lKa"], lKe = g[, "lKe"] + g[, "lCl"], lV = g[, "lCl"])
  v
}

t0 <- proc.time()[["elapsed"]]
# starting values: SSfol's self-start on the pooled data (as nlme users do), converted to lV = lCl - lKe
start <- tryCatch({
  s <- getInitial(Concentration ~ SSfol(Dose, Time, lKe, lKa, lCl), data = dat)
  c(lKa = s[["lKa"]], lKe = s[["lKe"]], lV = s[["lCl"]] - s[["lKe"]])
}, error = function(e) c(lKa = log(1.5), lKe = log(0.09), lV = log(32)))

ctrl <- nlmeControl(maxIter = 200, msMaxIter = 200, pnlsMaxIter = 20, returnObject = TRUE)
msg <- ""
fit <- tryCatch(
  withCallingHandlers(
    nlme(Concentration ~ folV(Dose, Time, lKa, lKe, lV), data = dat,
         fixed = lKa + lKe + lV ~ 1, random = pdDiag(lKa + lKe + lV ~ 1), groups = ~Id,
         start = start, control = ctrl),
    warning = function(w) { msg <<- paste(msg, conditionMessage(w)); invokeRestart("muffleWarning") }),
  error = function(e) { msg <<- paste(msg, conditionMessage(e)); NULL })
fit_s <- proc.time()[["elapsed"]] - t0

rows <- data.frame(name = character(), estimate = numeric(), lower = numeric(), upper = numeric())
add <- function(name, est, lo = NA, hi = NA) rows[nrow(rows) + 1, ] <<- list(name, est, lo, hi)
if (!is.null(fit)) {
  fe <- fixef(fit)
  iv <- tryCatch(intervals(fit, level = 0.95, which = "all"), error = function(e) {
    msg <<- paste(msg, "intervals(all):", conditionMessage(e))
    tryCatch(intervals(fit, level = 0.95, which = "fixed"), error = function(e2) NULL)
  })
  sds <- sqrt(diag(as.matrix(fit$modelStruct$reStruct$Id)) * fit$sigma^2)
  for (p in c("lKa", "lKe", "lV")) {
    ci <- if (!is.null(iv)) iv$fixed[p, c("lower", "upper")] else c(NA, NA)
    add(paste0("beta_", p), fe[[p]], ci[[1]], ci[[2]])
  }
  for (p in c("lKa", "lKe", "lV")) {
    re <- if (!is.null(iv) && !is.null(iv$reStruct)) iv$reStruct$Id else NULL
    key <- paste0("sd(", p, ")")
    ci <- if (!is.null(re) && key %in% rownames(re)) re[key, c("lower", "upper")] else c(NA, NA)
    add(paste0("omega_", p), sds[[p]], ci[[1]], ci[[2]])
  }
  sg <- if (!is.null(iv) && !is.null(iv$sigma)) iv$sigma else c(lower = NA, "est." = fit$sigma, upper = NA)
  add("sigma", fit$sigma, sg[["lower"]], sg[["upper"]])
  add("minus2ll", -2 * as.numeric(logLik(fit)))
}
add("fit_s", fit_s)
# returnObject = TRUE turns "maximum number of iterations ... reached without convergence" into a warning; an
# LME-step nlminb() warning in an intermediate iteration is kept in the message but is not a failed fit
add("converged", as.numeric(!is.null(fit) && !grepl("without convergence", msg, ignore.case = TRUE)))
rows$message <- ""
rows$message[rows$name == "converged"] <- trimws(gsub("[\r\n,]", " ", msg))
write.csv(rows, args[2], row.names = FALSE)
