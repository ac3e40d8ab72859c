# One image for every service: `ml-connector run poller|mapper|writer|webhooks`.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY emulators ./emulators
COPY flows ./flows
RUN pip install --no-cache-dir . && useradd --system --uid 10001 mlc
USER mlc
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
ENTRYPOINT ["ml-connector"]
CMD ["run", "all", "--health-port", "8080"]
